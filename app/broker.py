"""An embedded MQTT broker (amqtt) for the zero-setup demo. Real deployments, tests and CI use
mosquitto; this exists so that `splitpoint demo` needs nothing installed beyond pip."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading

from splitpoint.core.errors import SplitPointError


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class EmbeddedBroker:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._broker = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        try:
            from amqtt.broker import Broker
        except ImportError as exc:
            raise SplitPointError(
                "the embedded broker needs amqtt (pip install 'splitpoint[broker]'), "
                "or pass --mqtt mqtt://host:port"
            ) from exc
        ready, failed = threading.Event(), []
        cfg = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}}}

        def run() -> None:
            asyncio.set_event_loop(self._loop)

            async def boot() -> None:
                broker = self._broker = Broker(cfg, loop=self._loop)
                await broker.start()

            try:
                self._loop.run_until_complete(boot())
            except Exception as exc:  # surfaced to the caller below
                failed.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="splitpoint-broker", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or failed:
            raise SplitPointError(f"embedded MQTT broker did not start: {failed[0] if failed else 'timeout'}")
        return self

    def stop(self) -> None:
        if self._broker is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(5)
