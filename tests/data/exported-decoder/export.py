"""Writes two small decoders beside this file, exported by torch.onnx.export with onnxruntime-genai's
names (the caches in as past_key_values.{i}.key/value, out as present.{i}.key/value; logits out), in the
graph patterns a tracing exporter writes:
- decoder.onnx, GPT-2-style: input_ids, attention_mask and position_ids in; learned positions; the causal
  mask built once for all layers from attention_mask, input_ids' shape and the past length read off
  layer 0's cache;
- decoder-gqa.onnx, Llama-style: input_ids and position_ids in, no attention_mask; grouped-query
  attention (4 query heads, 2 cache heads), rotary positions from cos/sin tables indexed by
  position_ids, RMSNorm, a gated SiLU MLP;
- decoder-gqa-fp16.onnx: the same in float16;
- with --hf, decoder-hf-gpt2.onnx: Hugging Face transformers' own GPT-2 (GPT2LMHeadModel, 3 layers, width
  64, random weights), whose graph has the patterns of transformers' code: the ids reshaped before the
  embedding and their shape read again to shape the final hidden state, the cache's length read off a copy
  of layer 0's cache, the causal mask built from attention_mask and the cache position.
The tests split them without torch; this script needs torch (`pip install torch`), and with --hf
transformers 4.57 (`pip install transformers==4.57.6`).

    python tests/data/exported-decoder/export.py [--hf]
"""

import sys
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


def export(model: nn.Module, inputs: dict, past: list, layers: int, name: str, batch: bool = True) -> None:
    """``model`` (inputs, then the caches flat, in; logits, then the presents, out) exported beside this file
    as ``name``, with onnxruntime-genai's cache names and every length symbolic (the batch too, unless
    ``batch`` is False: an export that fixes it at 1)."""
    past_names = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    out_names = ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    b = {0: "batch"} if batch else {}
    lengths = {"input_ids": "sequence", "attention_mask": "total", "position_ids": "sequence"}
    axes = {
        **{n: {**b, 1: lengths[n]} for n in inputs},
        "logits": {**b, 1: "sequence"},
        **{n: {**b, 2: "past"} for n in past_names},
        **{n: {**b, 2: "total"} for n in out_names[1:]},
    }
    with torch.no_grad():
        torch.onnx.export(
            model,
            (*inputs.values(), *past),
            str(Path(__file__).with_name(name)),
            input_names=[*inputs, *past_names],
            output_names=out_names,
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )


def main() -> None:
    torch.manual_seed(0)
    model = Decoder().eval()
    with torch.no_grad():  # untied and scaled, so greedy decoding walks through many tokens
        model.head.weight.normal_(0, 1.0)
    hd = WIDTH // HEADS
    ids = torch.randint(0, VOCAB, (1, 5))
    mask, pos = torch.ones(1, 7, dtype=torch.int64), torch.arange(2, 7)[None]
    past = [torch.randn(1, HEADS, 2, hd) for _ in range(2 * LAYERS)]
    export(
        model, {"input_ids": ids, "attention_mask": mask, "position_ids": pos}, past, LAYERS, "decoder.onnx"
    )


class RMSNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w


GQA_LAYERS, GQA_WIDTH, GQA_HEADS, GQA_KV, GQA_VOCAB, GQA_POSITIONS = 3, 32, 4, 2, 100, 64
GQA_HD = GQA_WIDTH // GQA_HEADS


def _rotate(x):
    a, b = x[..., : GQA_HD // 2], x[..., GQA_HD // 2 :]
    return torch.cat([-b, a], -1)


class GQABlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        d, hd = GQA_WIDTH, GQA_HD
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.q, self.o = nn.Linear(d, GQA_HEADS * hd, bias=False), nn.Linear(d, d, bias=False)
        self.k, self.v = nn.Linear(d, GQA_KV * hd, bias=False), nn.Linear(d, GQA_KV * hd, bias=False)
        self.gate, self.up = nn.Linear(d, 64, bias=False), nn.Linear(d, 64, bias=False)
        self.down = nn.Linear(64, d, bias=False)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        b, t, d = x.shape
        h = self.n1(x)
        q = self.q(h).view(b, t, GQA_HEADS, GQA_HD).transpose(1, 2)
        k = self.k(h).view(b, t, GQA_KV, GQA_HD).transpose(1, 2)
        v = self.v(h).view(b, t, GQA_KV, GQA_HD).transpose(1, 2)
        q, k = q * cos + _rotate(q) * sin, k * cos + _rotate(k) * sin
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        group = GQA_HEADS // GQA_KV
        kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        a = ((q @ kk.transpose(-1, -2)) / GQA_HD**0.5 + mask).softmax(-1) @ vv
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        h = self.n2(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h)), k, v


class GQADecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(GQA_VOCAB, GQA_WIDTH)
        self.blocks = nn.ModuleList([GQABlock() for _ in range(GQA_LAYERS)])
        self.norm, self.head = RMSNorm(GQA_WIDTH), nn.Linear(GQA_WIDTH, GQA_VOCAB, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, GQA_HD, 2).float() / GQA_HD))
        angles = torch.outer(torch.arange(GQA_POSITIONS).float(), inv)
        self.register_buffer("cos", torch.cat([angles, angles], -1).cos())
        self.register_buffer("sin", torch.cat([angles, angles], -1).sin())

    def forward(self, input_ids, position_ids, *past):
        t, past_len = input_ids.shape[1], past[0].shape[2]
        x = self.embed(input_ids)
        cos, sin = self.cos[position_ids][:, None], self.sin[position_ids][:, None]
        mask = torch.full((t, past_len + t), float("-inf")).triu(past_len + 1)[None, None].to(x.dtype)
        presents = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        return (self.head(self.norm(x)), *presents)


def gqa(half: bool = False) -> None:
    """decoder-gqa.onnx, or with ``half`` decoder-gqa-fp16.onnx: the same model in float16 (weights,
    hidden states, caches and logits)."""
    torch.manual_seed(0)
    model = GQADecoder().eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0)
    if half:
        model = model.half()
    ids, pos = torch.randint(0, GQA_VOCAB, (1, 5)), torch.arange(2, 7)[None]
    past = [
        torch.randn(1, GQA_KV, 2, GQA_HD, dtype=torch.float16 if half else torch.float32)
        for _ in range(2 * GQA_LAYERS)
    ]
    name = "decoder-gqa-fp16.onnx" if half else "decoder-gqa.onnx"
    export(model, {"input_ids": ids, "position_ids": pos}, past, GQA_LAYERS, name, batch=False)


HF_LAYERS, HF_HEADS, HF_WIDTH, HF_VOCAB, HF_POSITIONS = 3, 4, 64, 200, 128


class WithCache(nn.Module):
    """A transformers causal LM with its cache as flat tensors in and out."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
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


def hf_gpt2() -> None:
    """decoder-hf-gpt2.onnx: transformers' own GPT2LMHeadModel (needs transformers 4.57)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.integrations.executorch import sdpa_mask_without_vmap
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # the tracing exporter cannot follow the vmap transformers builds its masks with by default
    ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa_without_vmap", sdpa_mask_without_vmap)
    ALL_ATTENTION_FUNCTIONS.register("sdpa_without_vmap", ALL_ATTENTION_FUNCTIONS["sdpa"])
    cfg = GPT2Config(
        n_layer=HF_LAYERS,
        n_head=HF_HEADS,
        n_embd=HF_WIDTH,
        vocab_size=HF_VOCAB,
        n_positions=HF_POSITIONS,
        initializer_range=0.3,  # larger than GPT-2's 0.02, so greedy decoding walks through many tokens
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa_without_vmap"
    torch.manual_seed(0)
    model = WithCache(GPT2LMHeadModel(cfg).eval(), HF_LAYERS).eval()
    ids, mask = torch.randint(0, HF_VOCAB, (1, 4)), torch.ones(1, 6, dtype=torch.int64)
    pos = torch.arange(2, 6)[None]
    past = [torch.randn(1, HF_HEADS, 2, HF_WIDTH // HF_HEADS) for _ in range(2 * HF_LAYERS)]
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    export(model, inputs, past, HF_LAYERS, "decoder-hf-gpt2.onnx")


if __name__ == "__main__":
    main()
    gqa()
    gqa(half=True)
    if "--hf" in sys.argv:
        hf_gpt2()
