"""What a tail server runs with: every option validated once, before anything starts."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator

from splitpoint.core import wire
from splitpoint.core.codecs import Codec
from splitpoint.core.config import StrictConfig
from splitpoint.core.endpoints import Endpoint


class ServerConfig(StrictConfig):
    label: ClassVar[str] = "serve"
    bind: Endpoint = "tcp://127.0.0.1:5555"
    plans_dir: Path | None = None  # plans served at start; pushed plans are installed here
    workers: int = Field(2, ge=1, le=256)  # tail worker threads
    threads: int = Field(0, ge=0, le=1024)  # onnxruntime intra-op threads per tail session (0 = default)
    provider: str = "CPUExecutionProvider"
    max_message_bytes: int = Field(wire.DEFAULT_MAX_MESSAGE_BYTES, ge=1024, le=2**32)
    reply_codec: str = "float32"
    device_id: str = Field("server", min_length=1, max_length=128)
    mqtt: str | None = None  # telemetry broker URL
    metrics_interval_s: float = Field(2.0, gt=0)
    curve_secret_key: bytes | None = None  # CurveZMQ: this server's secret key (z85)
    curve_allow: tuple[bytes, ...] = ()  # client public keys allowed (z85); empty = any
    max_batch: int = Field(1, ge=1, le=1024)  # micro-batching: queued same-plan requests share a tail run

    @field_validator("reply_codec")
    @classmethod
    def _codec(cls, v: str) -> str:
        return Codec.parse(v).name
