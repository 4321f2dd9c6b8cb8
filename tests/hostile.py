"""Hostile messages for the tail server, generated from a seed: what a broken or malicious client sends.

Each generator returns a list of frames (the DEALER's view: no routing identity). Every such message has
at least one frame, so the server owes each one exactly one reply.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct

from splitpoint.core import wire
from splitpoint.core.codecs import encode


class Hostile:
    def __init__(self, seed: int, plan_id: str, tensor: str, payload: bytes, plan_json: bytes, files: dict):
        self.r = random.Random(seed)
        self.plan_id, self.tensor, self.payload = plan_id, tensor, payload
        self.plan_json, self.files = plan_json, files  # a real plan's plan.json and its files' bytes

    def header(self, **fields) -> bytes:
        h = {
            "v": 1,
            "type": "infer",
            "id": self.r.randrange(2**40),
            "plan": self.plan_id,
            "tensors": [self.tensor],
        }
        h.update(fields)
        return json.dumps({k: v for k, v in h.items() if v is not _DROP}).encode()

    # -- categories --------------------------------------------------------------------------------
    def random_bytes(self) -> list[bytes]:
        return [self.r.randbytes(self.r.randrange(0, 3000)) for _ in range(self.r.randrange(1, 5))]

    def deep_nesting(self) -> list[bytes]:
        n = self.r.choice([17, 64, 1000, 5000, 30000])
        opener, closer = self.r.choice([("[", "]"), ('{"a":', "}")])
        inner = opener * n + "1" + closer * n
        return [('{"v":1,"type":"ping","id":3,"meta":' + inner + "}").encode()]

    def wrong_types(self) -> list[bytes]:
        field, value = self.r.choice(
            [
                ("v", "1"),
                ("v", 2),
                ("v", 1.0),
                ("v", True),
                ("v", None),
                ("type", 7),
                ("type", "INFER"),
                ("type", "result"),
                ("id", -1),
                ("id", 2**64),
                ("id", 1.5),
                ("id", True),
                ("id", "7"),
                ("plan", 7),
                ("plan", "x" * 500),
                ("tensors", "x"),
                ("tensors", [1, 2]),
                ("tensors", [""]),
                ("tensors", ["a"] * 100),
                ("tensors", [self.tensor, self.tensor]),
                ("meta", []),
                ("meta", "m"),
                ("v", _DROP),
                ("type", _DROP),
            ]
        )
        return [self.header(**{field: value}), self.payload]

    def frame_counts(self) -> list[bytes]:
        k = self.r.choice([0, 2, 3, 70])
        return [self.header(), *([self.payload] * k)]

    def bad_payloads(self) -> list[bytes]:
        p = bytearray(self.payload)
        how = self.r.randrange(8)
        if how == 0:  # truncated anywhere
            p = p[: self.r.randrange(len(p))]
        elif how == 1:  # flipped bytes anywhere
            for _ in range(self.r.randrange(1, 8)):
                p[self.r.randrange(len(p))] = self.r.randrange(256)
        elif how == 2:  # a header that claims a huge tensor
            p[27:35] = struct.pack("<Q", 2**40)
        elif how == 3:  # NaN quantisation parameters (the codec is int8: params follow the shape)
            off = 27 + 8 * p[8] + 4
            p[off : off + 4] = struct.pack("<f", float("nan"))
        elif how == 4:  # a valid payload of the wrong shape
            import numpy as np

            p = bytearray(encode(np.zeros((1, 3, 5, 5), np.float32), "int8"))
        elif how == 5:  # the wrong dtype
            import numpy as np

            p = bytearray(encode(np.zeros((1, 2), np.int64), "float32"))
        elif how == 6:  # a corrupt zstd stage
            import numpy as np

            z = bytearray(encode(np.ones((1, 64, 64, 64), np.float32), "int8+zstd"))
            z[-10:] = b"\xff" * 10
            p = z
        else:  # a claimed body length that lies
            p[11:19] = struct.pack("<Q", self.r.randrange(2**32))
        return [self.header(), bytes(p)]

    def hostile_deploys(self) -> list[bytes]:
        names = ["plan.json", *self.files]
        frames = [self.plan_json, *self.files.values()]
        how = self.r.randrange(8)
        meta: dict = {"files": names}
        if how == 0:
            meta = {"files": self.r.choice([7, "plan.json", None, [1, 2], {"a": 1}])}
        elif how == 1:
            meta = {"files": ["../../etc/passwd", *names[1:]]}
        elif how == 2:
            frames[0] = b'{"format_version": 1, "files": [1, 2, 3]}'
        elif how == 3:
            frames[0] = self.r.randbytes(200)
        elif how == 4:  # a garbage model whose checksum matches a plan that lists it
            garbage = self.r.randbytes(512)
            plan = json.loads(self.plan_json)
            name = next(n for n in plan["files"] if n.endswith(".onnx"))
            plan["files"][name] = hashlib.sha256(garbage).hexdigest()
            plan.pop("plan_id")
            canon = json.dumps(plan, sort_keys=True, separators=(",", ":")).encode()
            plan["plan_id"] = hashlib.sha256(canon).hexdigest()
            frames = [
                json.dumps(plan).encode(),
                *[garbage if n == name else self.files[n] for n in names[1:]],
            ]
        elif how == 5:
            frames = frames[:-1]  # a file missing
        elif how == 6:
            meta = {"files": [*names, "extra.bin"]}
            frames = [*frames, b"x"]
        else:
            frames[0] = b"[" * 20000 + b"]" * 20000
        return [
            json.dumps({"v": 1, "type": "deploy", "id": self.r.randrange(1000), "meta": meta}).encode(),
            *frames,
        ]

    def odd_headers(self) -> list[bytes]:
        return [
            self.r.choice(
                [
                    b"",
                    b"null",
                    b"7",
                    b'"ping"',
                    b"[]",
                    b"{}",
                    "\u00e9\u00e8".encode("latin-1"),
                    b"{" * 70000,
                    b'{"v":1,"type":"pong","id":1}',
                    b'{"v":1,"type":"deployed","id":1}',
                    b'{"v":1,"type":"ping","id":1}',
                ]
            )
        ]

    CATEGORIES = (
        "random_bytes",
        "deep_nesting",
        "wrong_types",
        "frame_counts",
        "bad_payloads",
        "odd_headers",
    )

    def message(self, deploys: bool = True) -> tuple[str, list[bytes]]:
        if deploys and self.r.random() < 0.01:
            return "hostile_deploys", self.hostile_deploys()
        name = self.r.choice(self.CATEGORIES)
        return name, getattr(self, name)()


class _Drop:
    pass


_DROP = _Drop()


def ping(i: int) -> list[bytes]:
    return wire.Message(wire.PING, i).to_frames()
