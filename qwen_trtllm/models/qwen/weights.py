"""The one table of Qwen (v1) weights: every Hugging Face tensor, what it is called in the FT directory, in the
engine and in transformers' Qwen2ForCausalLM, how tensor parallelism splits it, and its shape.

Dimensions: H hidden_size, V vocab_size, F = intermediate_size/2 (the width of one MLP branch, w1 or w2), tp
ranks, r a rank. Shapes are Hugging Face's nn.Linear [out, in]. Layer rows are named relative to their layer
prefix: Hugging Face "transformer.h.{i}.", FT "model.layers.{i}.", engine "layers.{i}.", Qwen2
"model.layers.{i}."; global rows carry full names.

Fused engine tensors (concatenated on the out axis, dim 0, in `part` order):
  attn.qkv.weight [3*H/tp, H] and attn.qkv.bias [3*H/tp]: c_attn, rows q | k | v, each the rank's own heads;
  mlp.gate_up.weight [2*F/tp, H] = [w2 (the gated branch) | w1 (up)].
Tensor-parallel splits (Hugging Face layout):
  none    replicated on every rank;
  column  split on the out axis (dim 0): [F, H] -> [F/tp, H];
  row     split on the in axis (dim 1): [H, F] -> [H, F/tp];
  qkv     [3H, ...] viewed [3, H, ...]; rank r keeps its slice of the middle axis from each of q, k and v.
lm_head is column-split (vocab-parallel: rank r computes logits r*V/tp..(r+1)*V/tp - 1 and the ranks gather
them, as TensorRT-LLM's lm_head ColumnLinear with gather_output does); like every global row it is whole in the
FT directory (TensorRT-LLM's converter writes lm_head.weight.bin once) and is split when the engine is built.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Split = Literal["none", "column", "row", "qkv"]

HF_LAYER_PREFIX = "transformer.h.{}."
FT_LAYER_PREFIX = "model.layers.{}."
ENGINE_LAYER_PREFIX = "layers.{}."
QWEN2_LAYER_PREFIX = "model.layers.{}."


@dataclass(frozen=True)
class Weight:
    """One Hugging Face tensor. hf/ft/engine/qwen2 are relative to the layer prefix when per_layer.

    engine + part: the engine tensor it lands in and its block there (0 unless fused; blocks are equal and
    concatenated on dim 0). qwen2: the Qwen2ForCausalLM tensors it becomes, equal chunks of dim 0 in this order.
    shape: one entry per dimension, "H", "V", "F" with an optional integer factor ("3H").
    """

    hf: str
    ft: str
    engine: str
    qwen2: tuple[str, ...]
    shape: tuple[str, ...]
    split: Split = "none"
    part: int = 0
    per_layer: bool = True

    @property
    def ft_kind(self) -> str:
        """The FT format's split kind: global | replicated | qkv | qkv_bias | column | row (global rows are never
        split in the FT directory, whatever the engine's split)."""
        if self.split == "none" or not self.per_layer:
            return "replicated" if self.per_layer else "global"
        if self.split == "qkv":
            return "qkv_bias" if len(self.shape) == 1 else "qkv"
        return self.split

    @property
    def parts(self) -> int:
        """How many Hugging Face tensors share this row's engine tensor (2 for gate_up, else 1)."""
        return ENGINE_PARTS[self.engine]

    def hf_name(self, layer: int | None = None) -> str:
        return self._name(self.hf, HF_LAYER_PREFIX, layer)

    def ft_name(self, layer: int | None = None) -> str:
        return self._name(self.ft, FT_LAYER_PREFIX, layer)

    def engine_name(self, layer: int | None = None) -> str:
        return self._name(self.engine, ENGINE_LAYER_PREFIX, layer)

    def qwen2_names(self, layer: int | None = None) -> tuple[str, ...]:
        return tuple(self._name(n, QWEN2_LAYER_PREFIX, layer) for n in self.qwen2)

    def _name(self, name: str, prefix: str, layer: int | None) -> str:
        return prefix.format(layer) + name if self.per_layer else name

    def hf_shape(self, hidden_size: int, vocab_size: int, ffn_hidden_size: int) -> tuple[int, ...]:
        """The Hugging Face shape for these dimensions (ffn_hidden_size = F = intermediate_size/2)."""
        dims = {"H": hidden_size, "V": vocab_size, "F": ffn_hidden_size}
        return tuple(int(d[:-1] or 1) * dims[d[-1]] for d in self.shape)


_Q, _K, _V = (f"self_attn.{n}_proj" for n in "qkv")

# In Hugging Face file order; the per-layer rows are contiguous and repeat once per layer.
# Columns: hf, ft, engine, qwen2, shape, split, part (block of a fused engine tensor), per_layer.
WEIGHTS: tuple[Weight, ...] = (
    Weight("transformer.wte.weight", "vocab_embedding.weight", "embed.weight", ("model.embed_tokens.weight",),
           ("V", "H"), per_layer=False),
    Weight("ln_1.weight", "ln_1.weight", "ln_1.weight", ("input_layernorm.weight",), ("H",)),
    Weight("attn.c_attn.weight", "attention.qkv.weight", "attn.qkv.weight",
           (f"{_Q}.weight", f"{_K}.weight", f"{_V}.weight"), ("3H", "H"), "qkv"),
    Weight("attn.c_attn.bias", "attention.qkv.bias", "attn.qkv.bias",
           (f"{_Q}.bias", f"{_K}.bias", f"{_V}.bias"), ("3H",), "qkv"),
    Weight("attn.c_proj.weight", "attention.dense.weight", "attn.dense.weight", ("self_attn.o_proj.weight",),
           ("H", "H"), "row"),
    Weight("ln_2.weight", "ln_2.weight", "ln_2.weight", ("post_attention_layernorm.weight",), ("H",)),
    Weight("mlp.w1.weight", "mlp.w1.weight", "mlp.gate_up.weight", ("mlp.up_proj.weight",), ("F", "H"), "column",
           part=1),
    Weight("mlp.w2.weight", "mlp.w2.weight", "mlp.gate_up.weight", ("mlp.gate_proj.weight",), ("F", "H"), "column",
           part=0),
    Weight("mlp.c_proj.weight", "mlp.c_proj.weight", "mlp.c_proj.weight", ("mlp.down_proj.weight",), ("H", "F"),
           "row"),
    Weight("transformer.ln_f.weight", "ln_f.weight", "ln_f.weight", ("model.norm.weight",), ("H",), per_layer=False),
    Weight("lm_head.weight", "lm_head.weight", "lm_head.weight", ("lm_head.weight",), ("V", "H"), "column",
           per_layer=False),
)

LAYER_WEIGHTS = tuple(w for w in WEIGHTS if w.per_layer)
GLOBAL_WEIGHTS = tuple(w for w in WEIGHTS if not w.per_layer)
_FIRST_LAYER_ROW = WEIGHTS.index(LAYER_WEIGHTS[0])
assert WEIGHTS[_FIRST_LAYER_ROW:_FIRST_LAYER_ROW + len(LAYER_WEIGHTS)] == LAYER_WEIGHTS, "layer rows not contiguous"
ENGINE_PARTS = Counter(w.engine for w in WEIGHTS)
# The layers' linears (tensor-parallel 2-D weights) by module name, in file order: Hugging Face's (the GPTQ
# checkpoints' prefixes: attn.c_attn, attn.c_proj, mlp.w1, mlp.w2, mlp.c_proj) and the engine's (attn.qkv,
# attn.dense, mlp.gate_up, mlp.c_proj; the ones weight-only quantisation replaces).
_LINEAR_ROWS = tuple(w for w in LAYER_WEIGHTS if w.split != "none" and len(w.shape) == 2)
HF_LINEARS = tuple(w.hf.removesuffix(".weight") for w in _LINEAR_ROWS)
ENGINE_LINEARS = tuple(dict.fromkeys(w.engine.removesuffix(".weight") for w in _LINEAR_ROWS))


def iter_weights(num_layers: int) -> Iterator[tuple[Weight, int | None]]:
    """(row, layer index or None for a global row) for every tensor of a checkpoint, in Hugging Face file order."""
    yield from ((w, None) for w in WEIGHTS[:_FIRST_LAYER_ROW])
    for i in range(num_layers):
        yield from ((w, i) for w in LAYER_WEIGHTS)
    yield from ((w, None) for w in WEIGHTS[_FIRST_LAYER_ROW + len(LAYER_WEIGHTS):])


def hf_shapes(hidden_size: int, vocab_size: int, ffn_hidden_size: int, num_layers: int) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of every weight, in file order."""
    return {w.hf_name(i): w.hf_shape(hidden_size, vocab_size, ffn_hidden_size) for w, i in iter_weights(num_layers)}


_GLOBAL_BY_HF = {w.hf: w for w in GLOBAL_WEIGHTS}
_LAYER_BY_HF = {w.hf: w for w in LAYER_WEIGHTS}
HF_PREFIX = HF_LAYER_PREFIX.format("")


def lookup_hf(name: str) -> tuple[Weight, int | None] | None:
    """A full Hugging Face name -> (its row, its layer index or None); None for a name outside the table."""
    if name in _GLOBAL_BY_HF:
        return _GLOBAL_BY_HF[name], None
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["transformer", "h"] and parts[2].isdigit() and parts[3] in _LAYER_BY_HF:
        return _LAYER_BY_HF[parts[3]], int(parts[2])
    return None


def shard_view(t: Tensor, split: Split, rank: int, tp: int) -> Tensor:
    """Rank r's share of a Hugging Face tensor, as a view: none -> t; column [out, in] -> [out/tp, in];
    row [out, in] -> [out, in/tp]; qkv [3H, ...] -> [3, H/tp, ...] (q, k, v blocks of the rank's heads)."""
    if split == "none":
        return t
    if split == "column":
        return t.chunk(tp, dim=0)[rank]
    if split == "row":
        return t.chunk(tp, dim=1)[rank]
    if split == "qkv":
        return t.view(3, t.shape[0] // 3, *t.shape[1:]).chunk(tp, dim=1)[rank]
    raise AssertionError(split)


def shard(t: Tensor, split: Split, rank: int, tp: int) -> Tensor:
    """shard_view with qkv flattened back to [3*H/tp, ...] (the engine's layout of one rank)."""
    v = shard_view(t, split, rank, tp)
    return v.reshape(-1, *t.shape[1:]) if split == "qkv" else v


def fuse(items: Iterable[tuple[Weight, str, Tensor]]) -> dict[str, Tensor]:
    """(row, engine name, tensor in engine layout) -> engine state dict. Rows that share an engine tensor are
    concatenated on dim 0 in part order ([w2 | w1] for gate_up); unfused tensors pass through uncopied."""
    out: dict[str, Tensor] = {}
    pending: dict[str, list[Tensor | None]] = {}
    for w, name, t in items:
        if w.parts == 1:
            out[name] = t
            continue
        blocks = pending.setdefault(name, [None] * w.parts)
        blocks[w.part] = t
        out.setdefault(name, t)  # a placeholder that keeps the dict in first-seen order
        if all(b is not None for b in blocks):
            out[name] = torch.cat(pending.pop(name))
    assert not pending, f"engine tensors missing parts: {sorted(pending)}"
    return out


def qwen2_tensors(w: Weight, t: Tensor, layer: int | None) -> dict[str, Tensor]:
    """A row's tensor in Hugging Face layout (or its block of an unsharded engine tensor) -> the Qwen2
    tensors it becomes (views: equal chunks of dim 0, e.g. c_attn [3H, H] -> q, k, v [H, H])."""
    return dict(zip(w.qwen2_names(layer), t.chunk(len(w.qwen2), dim=0), strict=True))


def engine_to_qwen2(sd: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """A tp-1 engine state dict -> the Qwen2ForCausalLM state dict over the same storage (views, no copies)."""
    out: dict[str, Tensor] = {}
    for w, i in iter_weights(num_layers):
        out.update(qwen2_tensors(w, sd[w.engine_name(i)].chunk(w.parts, dim=0)[w.part], i))
    return out
