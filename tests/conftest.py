from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest

# The models tests build with onnx.helper are saved at IR 10 at most, not at the installed onnx's newest:
# onnx 1.23 writes IR 14, which onnxruntime reads from 1.31 on, and the tests run at the dependency floors
# too (.ci/floors). SplitPoint's own models carry IR 8 or their source model's, whatever onnx writes.
onnx.IR_VERSION = min(onnx.IR_VERSION, 10)

# Zoo builds are cached per test session, never in the user's home.
os.environ.setdefault(
    "SPLITPOINT_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "splitpoint")
)

SMALL = {"width": 0.25, "resolution": 48}


def random_feeds(model, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    from splitpoint.core.samples import sample_feeds

    return sample_feeds(model, batch, seed)


def run_cli(
    *args: str,
    check: bool = False,
    timeout: int = 300,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "splitpoint.app", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"splitpoint {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="session")
def small_models():
    from splitpoint.core import zoo

    return {
        name: zoo.build(name, width=SMALL["width"], resolution=max(SMALL["resolution"], e.min_resolution))
        for name, e in zoo.ZOO.items()
        if not e.trained  # trained models have fixed weights and sizes (tests/test_trained.py)
    }


@pytest.fixture(scope="session")
def small_resnet18(tmp_path_factory) -> Path:
    """A quarter-width ResNet-18 at 64×64 saved once per session: a real residual DAG that runs in
    about a millisecond. Tests that write plans or profiles put them in their own directories."""
    import onnx

    from splitpoint.core import zoo

    path = tmp_path_factory.mktemp("small-resnet18") / "r18.onnx"
    onnx.save_model(zoo.build("resnet18", width=0.25, resolution=64), str(path))
    return path


def make_certificates(directory: Path) -> Path:
    """A CA of its own (ca.pem), a broker certificate it signed for 127.0.0.1 (server.pem, server.key) and a
    client certificate it signed (client.pem, client.key), made with the openssl command: what a fleet's
    private broker has. Returns ``directory``."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed: apt-get install openssl (.ci/run does this)")

    def ssl_cmd(args: str, *extra: str) -> None:
        subprocess.run(["openssl", *args.split(), *extra], cwd=directory, check=True, capture_output=True)

    directory.mkdir(parents=True, exist_ok=True)
    ssl_cmd("req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=fleet-ca")
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, extra in (("server", ["-extfile", "san.cnf"]), ("client", [])):
        ssl_cmd(f"req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj /CN={name}")
        ssl_cmd(
            f"x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {name}.pem -days 2",
            *extra,
        )
    return directory


@contextlib.contextmanager
def running_mosquitto(
    directory: Path,
    anonymous: bool = True,
    port: int | None = None,
    users: dict[str, str] | None = None,
    tls: Path | None = None,
    client_certificates: bool = False,
) -> Iterator[str]:
    """A real mosquitto broker on a free loopback port, or ``port`` (to start one again where an earlier
    one was), installed by .ci/run with apt-get; its URL. ``anonymous=False``: one that refuses every
    client without credentials; ``users``: the names and passwords it accepts (mosquitto_passwd).
    ``tls``: a folder from ``make_certificates``: the listener speaks TLS only (an mqtts:// URL), and with
    ``client_certificates`` refuses a client without a certificate its CA signed."""
    import shutil
    import socket
    import time

    exe = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )
    if exe is None:
        pytest.fail("mosquitto is not installed: apt-get install mosquitto (.ci/run does this)")
    if port is None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
    conf = directory / "mosquitto.conf"
    text = f"listener {port} 127.0.0.1\nallow_anonymous {str(anonymous).lower()}\npersistence false\n"
    if tls is not None:
        text += f"cafile {tls / 'ca.pem'}\ncertfile {tls / 'server.pem'}\nkeyfile {tls / 'server.key'}\n"
        text += f"require_certificate {str(client_certificates).lower()}\n"
    # its log (connections, refusals, take-overs) beside the config: what a failed telemetry test reads
    text += "log_dest stdout\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
    if users:
        passwd = directory / "passwd"
        passwd.touch(0o600)
        for name, password in users.items():
            subprocess.run(["mosquitto_passwd", "-b", str(passwd), name, password], check=True)
        text += f"password_file {passwd}\n"
    if (users or tls is not None) and os.geteuid() == 0:
        text += "user root\n"  # mosquitto run as root reads its files as user mosquitto: not these 0600 ones
    conf.write_text(text)
    with open(directory / "mosquitto.log", "wb") as log:
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.02)
    url = f"{'mqtts' if tls is not None else 'mqtt'}://127.0.0.1:{port}"
    BROKER_LOGS[url] = directory / "mosquitto.log"
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(5)


BROKER_LOGS: dict[str, Path] = {}  # each broker's log, by URL


@pytest.fixture
def broker_log() -> Callable[[str], str]:
    """The last lines a broker logged (connections, refusals, take-overs): what an assertion about
    telemetry that did not arrive shows, so a failure on a loaded machine says why."""

    def tail(url: str, lines: int = 40) -> str:
        path = BROKER_LOGS.get(url)
        if path is None or not path.exists():
            return f"(no log for {url})"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    return tail


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory):
    with running_mosquitto(tmp_path_factory.mktemp("mosquitto")) as url:
        yield url
