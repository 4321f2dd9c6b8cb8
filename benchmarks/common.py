"""Helpers shared by the benchmark scripts: timing, machine facts, result files."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in ``--help``, also for options without a help line, so a reader of a
    result can tell which settings produced it without opening the script."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and action.default not in (None, argparse.SUPPRESS):
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "%(default)" in text or action.default is None:
            return text
        return super()._get_help_string(action)


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """The script's parser: its docstring's first paragraph as the description, defaults shown."""
    first = (doc or "").strip().split("\n\n")[0]
    return argparse.ArgumentParser(description=" ".join(first.split()) or None, formatter_class=_ShowDefaults)


def timed(fn, repeat: int = 5, warmup: int = 1) -> tuple[float, list[float], object]:
    """Median seconds of ``fn()`` over ``repeat`` runs, all samples, and the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples, result


def machine() -> dict:
    import os

    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def verdict(ok: bool | None) -> str:
    """A target's verdict, computed from the measured figure: "met", "MISSED" or "not measured"."""
    return "not measured" if ok is None else "met" if ok else "MISSED"


def targets_table(targets: list[tuple[str, str, bool | None]]) -> list[str]:
    """A "## Targets" section: each target, what was measured, and the verdict computed from it."""
    return [
        "## Targets",
        "",
        "| target | measured | verdict |",
        "|---|---:|---|",
        *[f"| {t} | {m} | **{verdict(ok)}** |" for t, m, ok in targets],
        "",
    ]


def write_results(
    name: str, data: dict, markdown: str, out: Path | None = None, machine_facts: dict | None = None
) -> None:
    """``name``.json (the figures and the machine they were taken on) and ``name``.md in ``out``
    (default: benchmarks/results). ``machine_facts`` keeps a saved run's machine when only the
    markdown is rewritten from it."""
    out = out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    facts = machine_facts or machine()
    markdown = with_machine(markdown, facts)
    (out / f"{name}.json").write_text(json.dumps({"machine": facts, **data}, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(markdown)


def with_machine(markdown: str, facts: dict) -> str:
    """The report with the machine and date it was measured on after its first paragraph, unless it names
    the CPU already: "on this machine" says nothing to a reader of the committed file."""
    if not facts.get("cpu") or facts["cpu"] in markdown:
        return markdown
    line = (
        f"Measured on {facts['cpu']} ({facts.get('cores')} cores), Python {facts.get('python')}, onnxruntime "
        f"{facts.get('onnxruntime')}, {facts.get('when')}."
    )
    head, sep, rest = markdown.partition("\n\n")
    body, sep2, tail = rest.partition("\n\n")
    return f"{head}{sep}{body}\n\n{line}{sep2}{tail}" if sep2 else f"{markdown.rstrip()}\n\n{line}\n"
