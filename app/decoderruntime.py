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
from pathlib import Path

from splitpoint.core.decoders import ZooDecoder
from splitpoint.core.errors import SplitPointError
from splitpoint.core.plandir import write_decoder_plan
from splitpoint.partitioner.costmodel import Link
from splitpoint.partitioner.decoderplan import evaluate, measure

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
            gens = [
                _generate(plans / "tiny", bind, prompt_tokens, new_tokens, edge_cpus) for _ in range(runs)
            ]
        finally:
            stop(srv)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    model = evaluate(tiny, 2, "float32", "float32", Link("loopback", 1e6, 1e6, 0.0))
    pre = statistics.median(g["ttft_ms"] for g in gens) - model.ttft_ms
    step = statistics.median(g["tpot_ms"] for g in gens) - model.tpot_ms
    return max(pre, 0.0), max(step, 0.0)


def _generate(plan: Path, server: str, prompt_tokens: int, new_tokens: int, cpus: float | None) -> dict:
    args = ["generate", str(plan), "--server", server, "--prompt-tokens", str(prompt_tokens)]
    args += ["--max-new-tokens", str(new_tokens), "--threads", "1", "--timeout", "60"]
    if cpus is not None:
        args += ["--cpus", str(cpus)]
    r = subprocess.run(splitpoint_command(*args), capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SplitPointError(f"measuring the runtime's time per step: generate failed: {r.stderr[-1000:]}")
    return json.loads(r.stdout)
