"""Writes decoder-hf-gpt2.onnx beside this file: Hugging Face transformers' own GPT-2 (GPT2LMHeadModel, 3
layers, width 64, random weights), exported by torch.onnx.export with the cache as onnxruntime-genai names
it. Its graph has the patterns of transformers' code: the ids reshaped before the embedding and their
shape read again to shape the final hidden state, the cache's length read off a copy of layer 0's cache,
the causal mask built from attention_mask and the cache position. Needs torch and transformers 4.57
(`pip install torch transformers==4.57.6`).

    python tests/data/exported-decoder/export_hf.py
"""

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.cache_utils import DynamicCache
from transformers.integrations.executorch import sdpa_mask_without_vmap
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

LAYERS, HEADS, WIDTH, VOCAB, POSITIONS = 3, 4, 64, 200, 128

# the tracing exporter cannot follow the vmap transformers builds its masks with by default
ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa_without_vmap", sdpa_mask_without_vmap)
ALL_ATTENTION_FUNCTIONS.register("sdpa_without_vmap", ALL_ATTENTION_FUNCTIONS["sdpa"])


class WithCache(torch.nn.Module):
    """The model with its cache as flat tensors in and out."""

    def __init__(self, model: GPT2LMHeadModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache()
        for i in range(LAYERS):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def main() -> None:
    cfg = GPT2Config(
        n_layer=LAYERS,
        n_head=HEADS,
        n_embd=WIDTH,
        vocab_size=VOCAB,
        n_positions=POSITIONS,
        initializer_range=0.3,  # larger than GPT-2's 0.02, so greedy decoding walks through many tokens
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa_without_vmap"
    torch.manual_seed(0)
    model = WithCache(GPT2LMHeadModel(cfg).eval()).eval()
    hd = WIDTH // HEADS
    ids, mask, pos = (
        torch.randint(0, VOCAB, (1, 4)),
        torch.ones(1, 6, dtype=torch.int64),
        torch.arange(2, 6)[None],
    )
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
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids, mask, pos, *past),
            str(Path(__file__).with_name("decoder-hf-gpt2.onnx")),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=out_names,
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )


if __name__ == "__main__":
    main()
