"""Per-token activation codecs on a decoder split: greedy agreement, next-token KL and bytes per token.

A decoder sends one hidden state per new token (the whole prompt's in prefill). Its few outlier channels
set every token's quantisation range, which is what ``int4-ol`` (the outlier columns sent exact) is for.
Measured on ``decoder-tiny`` (random weights with documented outliers: ``splitpoint.core.zoo.decoder``),
teacher-forced against the float split (``splitpoint.partitioner.decoderfidelity``), at each cut between
layers.

    python benchmarks/bench_decoder_codecs.py [--prompts 16] [--prompt-tokens 16] [--new-tokens 32]
"""

from __future__ import annotations

import statistics

import numpy as np
from common import arguments, targets_table, write_results

from splitpoint.core.codecs import encode
from splitpoint.core.quantize import quantize_matmul_weights
from splitpoint.core.zoo.decoder import DECODER_TINY, build_decoder, empty_past, hidden_name
from splitpoint.partitioner.decoderfidelity import measure

CODECS = ["float16", "int8", "int8-ch", "int8-ol", "int4", "int4-ol", "int8-ol+zstd"]
Q4_CODECS = ["float32", "int8-ol"]  # with the edge's layers in 4-bit weights (MatMulNBits)


def bytes_per_token(cut: int, prompt: np.ndarray) -> dict[str, dict[str, float]]:
    """Payload bytes of the prefill (per prompt token) and of one decode step, per codec."""
    import onnxruntime as ort

    head = ort.InferenceSession(
        build_decoder(DECODER_TINY, layers=(0, cut)).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    name = hidden_name(cut - 1)
    past = empty_past(DECODER_TINY, layers=(0, cut))
    full = head.run([name], {"input_ids": prompt, **past})[0]
    one = full[:, -1:, :]
    return {
        c: {
            "prefill_per_token": len(encode(full, c)) / full.shape[1],
            "decode_step": float(len(encode(one, c))),
        }
        for c in ["float32", *CODECS]
    }


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    spec = DECODER_TINY
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, spec.vocab, (1, args.prompt_tokens)) for _ in range(args.prompts)]
    rows = []
    for cut in range(1, spec.layers):
        head = build_decoder(spec, layers=(0, cut))
        tail = build_decoder(spec, layers=(cut, spec.layers))
        fid = measure(head, tail, CODECS, prompts, args.new_tokens)
        sizes = bytes_per_token(cut, prompts[0])
        for c in CODECS:
            rows.append({"cut": cut, "head_weights": "float32", **fid[c].to_dict(), "bytes": sizes[c]})
        q4 = measure(head, tail, Q4_CODECS, prompts, args.new_tokens, test_head=quantize_matmul_weights(head))
        for c in Q4_CODECS:
            rows.append({"cut": cut, "head_weights": "int4", **q4[c].to_dict(), "bytes": sizes[c]})
    f32 = bytes_per_token(1, prompts[0])["float32"]

    def med(codec: str, key: str) -> float:
        return statistics.median(
            r[key]["value"] for r in rows if r["codec"] == codec and r["head_weights"] == "float32"
        )

    targets = []
    for c in ("int8-ch", "int8-ol"):
        what = "plain" if c == "int8-ch" else "outlier columns exact"
        a, k = med(c, "agreement"), med(c, "kl")
        targets += [
            (
                f"int8 per token, {what} ({c}): greedy agreement >= 0.97 (median over cuts)",
                f"{a:.3f}",
                a >= 0.97,
            ),
            (f"int8 per token, {what} ({c}): KL <= 0.005 (median over cuts)", f"{k:.2g}", k <= 0.005),
        ]
    ratio = med("int4", "kl") / max(med("int4-ol", "kl"), 1e-12)
    targets.append(("int4-ol: KL >= 3x lower than int4 (median over cuts)", f"{ratio:.0f}x", ratio >= 3))
    lines = [
        "# Per-token activation codecs on a decoder split",
        "",
        f"`python benchmarks/bench_decoder_codecs.py --prompts {args.prompts} --prompt-tokens "
        f"{args.prompt_tokens} --new-tokens {args.new_tokens}`: `decoder-tiny` ({spec.layers} layers, "
        f"hidden {spec.d_model}, {spec.outliers} outlier channels at {spec.outlier_scale:g}x the others' "
        "spread; random weights, see `splitpoint.core.zoo.decoder`), cut after each layer; each codec "
        f"teacher-forced against the float split over {args.prompts} random prompts x {args.new_tokens} "
        "generated tokens; 95 % intervals (Wilson for agreement, bootstrap for mean KL). Measured, not "
        f"derived. The float32 hidden state is {f32['decode_step']:.0f} bytes per decode step.",
        "",
        *targets_table(targets),
        "## Every cut and codec",
        "",
        "| cut (layers on the edge) | edge weights | codec | greedy agreement [95 % CI] | KL, nats [95 % CI] "
        "| bytes per decode step | bytes per prompt token (prefill) |",
        "|---:|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        a, k = r["agreement"], r["kl"]
        lines.append(
            f"| {r['cut']} | {r['head_weights']} | {r['codec']} | "
            f"{a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}] | "
            f"{k['value']:.2g} [{k['low']:.2g}, {k['high']:.2g}] | {r['bytes']['decode_step']:.0f} | "
            f"{r['bytes']['prefill_per_token']:.0f} |"
        )
    lines += [
        "",
        "Edge weights int4: the edge's layers as 4-bit MatMulNBits weights (block 32, symmetric; the "
        "embedding stays float), against the float model: the error of the weights and of the codec "
        "together.",
        "",
        "A single-token decode step carries a fixed header (shape, per-token parameters, the outlier "
        "section), so small payloads compress less than their element size suggests.",
        "",
    ]
    write_results(
        "decoder_codecs",
        {
            "args": vars(args),
            "rows": rows,
            "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in targets],
        },
        "\n".join(lines),
    )


if __name__ == "__main__":
    main()
