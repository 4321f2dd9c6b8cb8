"""Writes decoder.onnx beside this file: a small GPT-2-style decoder exported by torch.onnx.export, with
the interface exporters give a decoder (input_ids, attention_mask, position_ids and the caches in; logits
and the presents out; onnxruntime-genai's names) and the graph patterns a tracing exporter writes: the
causal mask built once for all layers from attention_mask, input_ids' shape and the past length read off
layer 0's cache. The tests split it without torch; this script needs torch (`pip install torch`).

    python tests/data/exported-decoder/export.py
"""

from pathlib import Path

import torch
from torch import nn

LAYERS, WIDTH, HEADS, VOCAB, POSITIONS = 4, 24, 3, 128, 128


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.fc, self.out = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x, mask, past_k, past_v):
        b, t, d = x.shape
        hd = d // HEADS
        q, k, v = (z.view(b, t, HEADS, hd).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(d, dim=2))
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        a = ((q @ k.transpose(-1, -2)) / hd**0.5 + mask).softmax(-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x)))), k, v


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, WIDTH), nn.Embedding(POSITIONS, WIDTH)
        self.blocks = nn.ModuleList([Block() for _ in range(LAYERS)])
        self.ln_f, self.head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        t, past_len = input_ids.shape[1], past[0].shape[2]
        x = self.wte(input_ids) + self.wpe(position_ids)
        causal = torch.ones(t, past_len + t, dtype=torch.bool).tril(diagonal=past_len)
        keep = causal[None, None] & attention_mask[:, None, None, :].bool()
        mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
        presents = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, mask, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        return (self.head(self.ln_f(x)), *presents)


def main() -> None:
    torch.manual_seed(0)
    model = Decoder().eval()
    with torch.no_grad():  # untied and scaled, so greedy decoding walks through many tokens
        model.head.weight.normal_(0, 1.0)
    hd = WIDTH // HEADS
    ids = torch.randint(0, VOCAB, (1, 5))
    mask, pos = torch.ones(1, 7, dtype=torch.int64), torch.arange(2, 7)[None]
    past = [torch.randn(1, HEADS, 2, hd) for _ in range(2 * LAYERS)]
    past_names = [f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
    out_names = ["logits"] + [f"present.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
        **{n: {0: "batch", 2: "past"} for n in past_names},
        **{n: {0: "batch", 2: "total"} for n in out_names[1:]},
    }
    torch.onnx.export(
        model,
        (ids, mask, pos, *past),
        str(Path(__file__).with_name("decoder.onnx")),
        input_names=["input_ids", "attention_mask", "position_ids", *past_names],
        output_names=out_names,
        dynamic_axes=axes,
        opset_version=17,
        dynamo=False,
    )


if __name__ == "__main__":
    main()
