"""What a tail server runs with: every option validated once, before anything starts.

Protected by default, as Redis's protected mode is: the default bind is loopback, and binding an
address other machines can reach needs CurveZMQ keys (encryption, and who may connect) unless the
operator says ``insecure``. Deploys carry models the server will run, so on a CurveZMQ server only the
keys of the deploy allow-list may deploy, not every edge that may infer.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from splitpoint.core import wire
from splitpoint.core.codecs import Codec
from splitpoint.core.config import StrictConfig
from splitpoint.core.endpoints import Endpoint, is_loopback
from splitpoint.core.telemetry import BrokerUrl


class ServerConfig(StrictConfig):
    label: ClassVar[str] = "serve"
    options: ClassVar[dict[str, str]] = {
        "plans_dir": "plans",
        "max_message_bytes": "max-message-mb (in bytes)",
        "next_timeout_s": "next-timeout",
        "next_connect_grace_s": "next-grace",
        "session_idle_s": "session-idle",
        "drain_s": "drain",
        "curve_secret_key": "curve-secret",
        "next_curve_server_key": "next-server-key",
    }
    bind: Endpoint = "tcp://127.0.0.1:5555"
    plans_dir: Path | None = None  # plans served at start; pushed plans are installed here
    workers: int = Field(1, ge=1, le=256)  # 1: the socket thread runs each tail itself (no hand-off)
    threads: int = Field(0, ge=0, le=1024)  # onnxruntime intra-op threads per tail session (0 = default)
    provider: str = "CPUExecutionProvider"
    max_message_bytes: int = Field(wire.DEFAULT_MAX_MESSAGE_BYTES, ge=1024, le=2**32)
    max_queue: int = Field(
        256, ge=1, le=1_000_000
    )  # requests waiting for a tail (the workers' running ones aside); past it: busy
    # replies libzmq holds for one connection that does not read them (ZMQ_SNDHWM); past it, dropped. Each
    # is up to a whole result: a client that never reads pins this many of them in the server's memory
    max_unread_replies: int = Field(1000, ge=1, le=100_000)
    reply_codec: str = "float32"
    device_id: str = Field("server", min_length=1, max_length=128)
    mqtt: BrokerUrl | None = None  # telemetry broker URL
    metrics_interval_s: float = Field(2.0, gt=0)
    curve_secret_key: bytes | None = None  # CurveZMQ: this server's secret key (z85)
    curve_allow: tuple[bytes, ...] = ()  # client public keys that may connect (z85); empty = any
    deploy_allow: tuple[bytes, ...] = ()  # with CurveZMQ: the only keys that may deploy (z85)
    insecure: bool = False  # bind a non-loopback address without CurveZMQ: anyone may deploy and run
    # a relay: the stage of each plan it runs, and where the next stage listens (None: the last stage)
    stage: int | None = Field(None, ge=0, le=16)
    next: Endpoint | None = None
    next_timeout_s: float = Field(10.0, gt=0, le=3600)  # a forwarded request unanswered this long fails
    # after start, how long a request may wait for the first connection to the next stage (a relay and
    # its next stage started together are not connected the moment the first request arrives)
    next_connect_grace_s: float = Field(5.0, ge=0, le=600)
    next_curve_server_key: bytes | None = None  # the next stage's CurveZMQ public key (z85)
    # decoder plans: KV-cache sessions, one per sequence
    max_sessions: int = Field(64, ge=1, le=1_000_000)
    max_cache_mb: float = Field(1024.0, gt=0, le=1 << 30)  # all sessions' caches together
    session_idle_s: float = Field(300.0, gt=0, le=86_400)  # a session unused this long is freed
    # on SIGTERM (stop): seconds to answer the requests already taken, new ones refused as unavailable
    drain_s: float = Field(5.0, ge=0, le=3600)
    heartbeat_s: float = Field(1.0, gt=0, le=60)  # towards the next stage (ZMTP heartbeats)
    dead_after_s: float = Field(5.0, gt=0, le=600)

    @field_validator("plans_dir")
    @classmethod
    def _plans_dir(cls, v: Path | None) -> Path | None:
        """A directory of plan directories (created if missing): one plan's own directory, or a file, is a
        mistake that served 0 plans and then failed the first deploy with a traceback."""
        if v is None:
            return v
        if v.exists() and not v.is_dir():
            raise ValueError(f"{v} is a file: give the directory the plans are kept in")
        if (v / "plan.json").is_file():
            raise ValueError(
                f"{v} is one plan's directory: give the directory that holds plan directories ({v.parent})"
            )
        return v

    @field_validator("reply_codec")
    @classmethod
    def _codec(cls, v: str) -> str:
        return Codec.parse(v).name

    @model_validator(mode="after")
    def _protected(self) -> ServerConfig:
        if not is_loopback(self.bind) and self.curve_secret_key is None and not self.insecure:
            raise ValueError(
                f"binding {self.bind} lets other machines deploy and run models; give this server "
                "CurveZMQ keys (--curve-secret, see `splitpoint keygen`) or pass --insecure"
            )
        if (self.curve_allow or self.deploy_allow) and self.curve_secret_key is None:
            raise ValueError("allow-lists need CurveZMQ: give --curve-secret too")
        if self.next is not None and self.stage is None:
            raise ValueError("--next forwards to the next stage: say which stage this one is (--stage)")
        if self.stage == 0:
            raise ValueError("--stage 0 is the edge's (its head): a relay runs stage 1 or later")
        if self.stage is not None and self.next is None:
            raise ValueError(
                f"--stage {self.stage} is a middle stage and forwards its cut tensor: give --next (the last "
                "stage is a server: `serve` without --stage)"
            )
        if self.next is not None and self.next == self.bind:
            raise ValueError(f"--next {self.next} is this relay's own address: give the next stage's")
        if self.next is not None and self.workers > 1:
            raise ValueError("a relay runs its stage on its socket thread: --workers 1")
        return self

    @property
    def curve(self) -> bool:
        return self.curve_secret_key is not None


class RelayConfig(ServerConfig):
    """``splitpoint relay``'s options: a server's, its errors said with the relay's names (its address
    is ``--listen``)."""

    label: ClassVar[str] = "relay"
    options: ClassVar[dict[str, str]] = {**ServerConfig.options, "bind": "listen"}
