"""What an edge client or daemon runs with: every option validated once, before anything starts."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator

from splitpoint.core import wire
from splitpoint.core.config import StrictConfig
from splitpoint.core.endpoints import Endpoint, is_loopback
from splitpoint.core.telemetry import BrokerUrl


class EdgeConfig(StrictConfig):
    label: ClassVar[str] = "edge"
    options: ClassVar[dict[str, str]] = {
        "timeout_s": "timeout",
        "plan_dir": "PLAN_DIR",
        "max_message_bytes": "max-message-mb (in bytes)",
    }
    plan_dir: Path
    server: Endpoint = "tcp://127.0.0.1:5555"
    window: int = Field(4, ge=1, le=4096)  # requests in flight at once (edge run: the plan's)
    # a request without a reply by then falls back (or fails); one still waiting for a worker (the head
    # or the local model busy with earlier requests) that long fails
    timeout_s: float = Field(2.0, gt=0)
    heartbeat_s: float = Field(0.5, gt=0)  # ping the server this often while idle
    # nothing heard for this long (or for timeout_s, if longer: a queued uplink is not a dead server): the
    # server is unreachable
    dead_after_s: float = Field(1.5, gt=0)
    fallback: bool = True  # run the whole model locally while the server is unreachable
    threads: int = Field(1, ge=0, le=1024)  # onnxruntime intra-op threads
    head_workers: int = Field(1, ge=1, le=64)
    device_id: str = Field("edge", min_length=1, max_length=128)
    mqtt: BrokerUrl | None = None
    max_message_bytes: int = Field(wire.DEFAULT_MAX_MESSAGE_BYTES, ge=1024, le=2**32)
    curve_server_key: bytes | None = None  # server's public key (z85) to enable CurveZMQ
    curve_keypair: tuple[bytes, bytes] | None = None  # this device's (public, secret), for allow-lists
    connect_grace_s: float = Field(1.0, ge=0)  # at start, wait this long for the server before falling back
    listen: Endpoint | None = None  # the daemon's local socket for applications and deploys
    insecure: bool = False  # let the local socket listen where other machines reach it (no CurveZMQ there)

    @model_validator(mode="after")
    def _plan_dir(self) -> EdgeConfig:
        if not self.plan_dir.is_dir():
            state = "is a file" if self.plan_dir.exists() else "does not exist"
            raise ValueError(f"plan directory {self.plan_dir} {state}")
        if self.listen and not is_loopback(self.listen) and not self.insecure:
            raise ValueError(
                f"listening on {self.listen} lets other machines deploy models to this device; use "
                "ipc:// or a loopback address, or pass --insecure"
            )
        return self


DEFAULT_WINDOW = 4
MAX_PLANNED_WINDOW = 64  # a planned window past this is capped: the server queues 256 by default


def planned_window(plan_dir: Path) -> int:
    """The window ``edge run`` uses when none is given: the requests in flight that the plan's predicted
    throughput needs (its planner's ``window``), capped at 64, else 4. A plan predicted at 2,665/s behind
    a 70 ms round trip needs 187 in flight; run at 4 it served 57/s."""
    from splitpoint.core.errors import PlanError
    from splitpoint.core.plan import Plan

    try:
        w = Plan.load(plan_dir, verify=False).predicted.get("window")
    except (PlanError, OSError):  # the client reports a plan it cannot load, with its reason
        return DEFAULT_WINDOW
    if type(w) is not int or w < 1:
        return DEFAULT_WINDOW
    return min(w, MAX_PLANNED_WINDOW)
