"""The runtime's own time per decoder step (client, wire, server session, codec framing), measured.

A decoder's TTFT and TPOT are its blocks, its codec and its link, derived from measurements, plus what
the runtime spends around them on every step. That part is measured here on ``decoder-tiny``, whose
layers compute next to nothing: a real ``splitpoint serve`` and ``splitpoint generate`` over loopback,
under the edge's CPU limit, less what the planner derives for the same run without a link. Left out,
it was 0.7-0.9 ms a step that no prediction held (a few per cent of TPOT on Wi-Fi, more on a fast link).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from splitpoint.core.decoders import ZooDecoder
from splitpoint.core.errors import SplitPointError
from splitpoint.core.plandir import write_decoder_plan
from splitpoint.partitioner.costmodel import Link
from splitpoint.partitioner.decoderplan import evaluate, measure
from splitpoint.profiles.cpulimit import cpu_limit

from .broker import free_port
from .process import check_started, splitpoint_command, start_server, stop


def runtime_overhead(
    prompt_tokens: int, new_tokens: int, edge_cpus: float | None, runs: int = 3, server_threads: int = 1
) -> tuple[float, float]:
    """(prefill, decode step) ms beyond model, codec and link, medians of ``runs`` generations."""
    spec = ZooDecoder("decoder-tiny")
    tiny = measure(
        spec,
        codecs=("float32",),
        head_weights=("float32",),
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        edge_cpus=edge_cpus,
        server_threads=server_threads,
    )
    work = Path(tempfile.mkdtemp(prefix="splitpoint-decoder-runtime-"))
    try:
        plans = work / "plans"
        write_decoder_plan(spec, plans / "tiny", edge_layers=2)
        bind = f"tcp://127.0.0.1:{free_port()}"
        srv = start_server(bind, plans, threads=server_threads)
        try:
            check_started([srv])
            gens = [generate(plans / "tiny", bind, prompt_tokens, new_tokens, edge_cpus) for _ in range(runs)]
        finally:
            stop(srv)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    model = evaluate(tiny, 2, "float32", "float32", Link("loopback", 1e6, 1e6, 0.0))
    pre = statistics.median(g["ttft_ms"] for g in gens) - model.ttft_ms
    step = statistics.median(g["tpot_ms"] for g in gens) - model.tpot_ms
    return max(pre, 0.0), max(step, 0.0)


def generate(
    plan: Path,
    server: str,
    prompt_tokens: int,
    new_tokens: int,
    cpus: float | None,
    prefix: Sequence[str] = (),
) -> dict:
    """``splitpoint generate`` as a child process (``prefix``: e.g. ``ip netns exec NS``), one onnxruntime
    thread, its JSON answer. The CPU limit is applied from here: inside a network namespace the cgroup
    tree is not visible (docs/architecture.md). The child loads its model and warms up before it
    generates."""
    cmd = splitpoint_command(
        "generate",
        str(plan),
        "--server",
        server,
        "--prompt-tokens",
        str(prompt_tokens),
        "--max-new-tokens",
        str(new_tokens),
        "--threads",
        "1",
        "--timeout",
        "60",
        prefix=prefix,
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with cpu_limit(cpus, proc.pid):
        out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SplitPointError(f"generate failed: {err[-2000:]}")
    return json.loads(out)
