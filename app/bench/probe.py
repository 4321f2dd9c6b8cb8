"""Measures an emulated link with real TCP traffic: request/response times for given sizes.

``serve`` answers each request (8-byte up length, 8-byte wanted reply length, payload) with a
reply of the wanted length; ``measure`` times whole request/response exchanges on the
client's clock alone, so no two clocks are ever subtracted.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import sys
import threading
import time

HEADER = struct.Struct("!QQ")


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = s.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError("peer closed")
        got += k
    return bytes(buf)


def _handle(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            up, down = HEADER.unpack(_recv_exact(conn, HEADER.size))
            _recv_exact(conn, up)
            conn.sendall(HEADER.pack(down, 0) + bytes(down))
    except (ConnectionError, OSError):
        conn.close()


def serve(sock: socket.socket) -> None:
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        threading.Thread(target=_handle, args=(conn,), daemon=True).start()


def start_server(host: str = "127.0.0.1", port: int = 0) -> tuple[socket.socket, tuple[str, int]]:
    sock = socket.create_server((host, port))
    threading.Thread(target=serve, args=(sock,), daemon=True).start()
    return sock, sock.getsockname()[:2]


def exchange(s: socket.socket, up: int, down: int) -> float:
    """Milliseconds from the first byte sent to the last reply byte received."""
    payload = HEADER.pack(up, down) + bytes(up)
    t0 = time.perf_counter()
    s.sendall(payload)
    got_down, _ = HEADER.unpack(_recv_exact(s, HEADER.size))
    _recv_exact(s, got_down)
    return (time.perf_counter() - t0) * 1e3


def measure(address: tuple[str, int], sizes: list[tuple[int, int]], repeats: int = 5) -> list[dict]:
    with socket.create_connection(address, timeout=60) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        exchange(s, 64, 64)  # connection warm-up (slow start, proxies' first accept)
        out = []
        for up, down in sizes:
            ms = [exchange(s, up, down) for _ in range(repeats)]
            out.append(
                {"up_bytes": up, "down_bytes": down, "median_ms": statistics.median(ms), "samples_ms": ms}
            )
        return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="link probe")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bind", default="127.0.0.1:0")
    m = sub.add_parser("measure")
    m.add_argument("--connect", required=True)
    m.add_argument("--sizes", default="64:64,1048576:64", help="up:down byte pairs")
    m.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        host, _, port = a.bind.rpartition(":")
        sock, addr = start_server(host, int(port))
        print(json.dumps({"listen": f"{addr[0]}:{addr[1]}"}), flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            sock.close()
    else:
        host, _, port = a.connect.rpartition(":")
        sizes = [(int(up), int(down)) for up, down in (p.split(":") for p in a.sizes.split(","))]
        json.dump(measure((host, int(port)), sizes, a.repeats), sys.stdout)


if __name__ == "__main__":
    main()
