"""Qwen (v1) in PyTorch, one forward path over a flat batch of tokens and a paged KV cache.

Implements the network of Qwen-7B (Bai et al., "Qwen Technical Report", 2023) as Qwen's own modeling_qwen.py
computes it: pre-RMSNorm blocks, fused QKV projection with bias, NeoX rotate-half rotary embeddings computed in
float32, causal attention, SwiGLU MLP c_proj(w1(x) * silu(w2(x))) (w2 is the gated branch), untied lm_head.
Beyond the trained context (seq_length) it applies Qwen's two extensions: dynamic NTK-aware rotary scaling
(the base grows with the prompt length, fixed per sequence for its generated tokens) and logn attention scaling
of the queries. Linear layers are tensor-parallel aware (column/row split + one all-reduce per sub-block,
fused with the residual add and RMSNorm after it; lm_head vocab-parallel, its logits gathered).

One step is a flat batch of tokens (in-flight batching, as TensorRT-LLM's PyTorch backend and vLLM run it): the
decode tokens of `num_decode` sequences first, then the prompt chunks of the sequences in prefill. Every layer
gets the same `AttentionMetadata`; keys and values live in KV cache blocks addressed through block tables.
The kernels are fixed when the model is loaded (`set_kernels`): the Triton kernels of qwen_trtllm.kernels, or
their `*_reference` twins in plain PyTorch (the CPU path and `--kernels torch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qwen_trtllm.config import QWenConfig
from qwen_trtllm.profiling import nvtx_range


def ntk_alpha(prompt_len: int, seq_length: int) -> float:
    """Qwen's dynamic NTK alpha for a prompt of prompt_len tokens: 1 inside the trained context.

    modeling_qwen.py: context_value = log2(len / seq_length) + 1, alpha = max(2^ceil(context_value) - 1, 1)."""
    context_value = math.log(prompt_len / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context_value) - 1, 1))


def sequence_ntk_alpha(config: QWenConfig, prompt_len: int) -> float:
    """A sequence's NTK alpha, fixed by its prompt length for its whole life (1 without dynamic NTK)."""
    return ntk_alpha(prompt_len, config.seq_length) if config.use_dynamic_ntk else 1.0


def rotary_inv_freq(config: QWenConfig, alpha: Tensor) -> Tensor:
    """Per-sequence inverse frequencies [S, rotary_dim // 2] (float32) for NTK alphas [S]:
    base = rotary_emb_base * alpha^(d / (d - 2)), inv_freq = base^(-2i/d) (modeling_qwen.py's RotaryEmbedding)."""
    d = config.rotary_dim
    base = config.rotary_emb_base * alpha.double() ** (d / (d - 2))
    exponent = torch.arange(0, d, 2, device=alpha.device, dtype=torch.float32) / d
    return (1.0 / (base.float()[:, None] ** exponent[None, :])).float()


@dataclass
class AttentionMetadata:
    """What every layer needs besides its input: the step's token layout and the paged KV cache.

    Tokens 0..num_decode-1 are one decode token per sequence (sequence i = token i); the remaining tokens are
    prefill chunks, query_start_loc giving their offsets (relative to the first prefill token). S sequences in all.
    """

    positions: Tensor  # [N] int64: each token's position in its sequence
    seq_index: Tensor | None  # [N] int32: each token's sequence (None: token i is sequence i, decode only)
    inv_freq: Tensor  # [S, rotary_dim // 2] float32: each sequence's rotary inverse frequencies (dynamic NTK)
    slot_mapping: Tensor  # [N] int64: KV cache slot (block * tokens_per_block + offset) each token writes
    block_tables: Tensor  # [S, max_blocks] int32
    seq_lens: Tensor  # [S] int32: keys valid after this step's writes
    context_lens: Tensor | None  # [S] int32: keys cached before this step (prefill rows)
    query_start_loc: Tensor | None  # [P + 1] int32 for the P = S - num_decode prefill sequences
    num_decode: int
    max_query_len: int  # the longest prefill chunk (0 without prefill)
    logits_indices: Tensor  # [S] int64: the token whose logits each sequence returns
    k_cache: Tensor  # [layers, num_blocks, heads, tokens_per_block, head_dim]
    v_cache: Tensor
    capture: dict | None = None  # when a dict, layers store named intermediate outputs in it
    k_scale: Tensor | None = None  # int8 / fp8 caches: [layers, num_blocks, heads, tokens_per_block] float32
    v_scale: Tensor | None = None  # (one scale per token and head, written with the codes); None otherwise


class Kernels:
    """The kernels one model runs, fixed at load time: Triton (`triton=True`) or their PyTorch references."""

    def __init__(self, triton: bool, tp: int = 1, device: torch.device | None = None):
        from qwen_trtllm import kernels as k
        from qwen_trtllm.kernels.all_reduce import AllReduce

        self.triton, self.tp = triton, tp
        pick = lambda name: getattr(k, name if triton else name + "_reference")
        self.rms_norm, self.rotary_kv_write, self.silu_mul = pick("rms_norm"), pick("rotary_kv_write"), \
            pick("silu_mul")
        self.decode_attention, self.prefill_attention = pick("paged_decode_attention"), \
            pick("paged_prefill_attention")
        self.rotary_decode_attention = pick("rotary_paged_decode_attention")
        # the tensor-parallel sum (NCCL, gloo on CPU), with Triton the one-shot kernel for decode-sized tensors,
        # fused there with the residual add + RMSNorm after it (all_reduce.rms_norm)
        self.all_reduce = AllReduce(tp, device if triton and device is not None and device.type == "cuda" else None,
                                    self.rms_norm)

    def gather_vocab(self, x: Tensor) -> Tensor:
        """Vocab-parallel logits: x [S, V/tp], this rank's vocabulary columns -> [S, V], every rank's in rank
        order (an all-gather: NCCL, gloo on CPU; in the dtype given, before the float32 cast: half the bytes)."""
        if self.tp == 1:
            return x
        import torch.distributed as dist

        out = x.new_empty(self.tp * x.shape[0], x.shape[1])
        gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)  # torch < 2.13: the latter
        gather(out, x.contiguous())
        return out.view(self.tp, *x.shape).transpose(0, 1).reshape(x.shape[0], -1)

    def linear(self, layer: nn.Module, x: Tensor, gated: bool = False) -> Tensor:
        """A linear layer; plain nn.Linear goes through the Triton GEMV for decode-sized inputs (SiLU*mul fused
        into it when gated). Quantised layers choose their own kernel (set by set_kernels); gated, those with
        `accepts_gated` (Fp8Linear, WeightOnlyLinear) take [gate | up] themselves, the others get silu_mul's output."""
        if self.triton and type(layer) is nn.Linear:
            from qwen_trtllm.kernels.gemv import linear

            return linear(x, layer.weight, layer.bias, gated=gated)
        if gated and getattr(layer, "accepts_gated", False):
            return layer(x, gated=True)
        return layer(self.silu_mul(x) if gated else x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class Attention(nn.Module):
    def __init__(self, config: QWenConfig, tp: int, layer: int):
        super().__init__()
        self.heads, self.head_dim, self.layer = config.num_attention_heads // tp, config.kv_channels, layer
        self.rotary_dim = config.rotary_dim
        self.logn_len = config.seq_length if config.use_logn_attn else 0
        width = self.heads * self.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * width, bias=True)  # column-parallel: [q_r | k_r | v_r]
        self.dense = nn.Linear(width, config.hidden_size, bias=False)  # row-parallel

    def forward(self, x: Tensor, meta: AttentionMetadata, ops: Kernels) -> Tensor:
        """x [N, hidden] -> this rank's partial output [N, hidden] (its heads through its rows of the dense
        projection; the attention output is the sum over ranks): rotary + logn + KV write, paged attention per
        phase (decode-only steps: all of it in one kernel)."""
        kc, vc = meta.k_cache[self.layer], meta.v_cache[self.layer]
        scales = {} if meta.k_scale is None else {"k_scale": meta.k_scale[self.layer],
                                                  "v_scale": meta.v_scale[self.layer]}  # quantised cache
        qkv = ops.linear(self.qkv, x)
        D, scale = meta.num_decode, 1.0 / math.sqrt(self.head_dim)
        if meta.seq_index is None:  # decode only, token i is sequence i: its inv_freq row, positions = seq_lens - 1
            o = ops.rotary_decode_attention(qkv, meta.inv_freq, meta.positions, meta.slot_mapping, kc, vc,
                                            meta.block_tables, meta.seq_lens, self.heads, self.head_dim,
                                            self.rotary_dim, scale, self.logn_len, **scales)
        else:
            q = ops.rotary_kv_write(qkv, meta.inv_freq, meta.positions, meta.slot_mapping, kc, vc, self.heads,
                                    self.head_dim, self.rotary_dim, self.logn_len, seq_index=meta.seq_index, **scales)
            parts = []
            if D:
                parts.append(ops.decode_attention(q[:D], kc, vc, meta.block_tables[:D], meta.seq_lens[:D], scale,
                                                  **scales))
            if q.shape[0] > D:
                parts.append(ops.prefill_attention(q[D:], kc, vc, meta.block_tables[D:], meta.query_start_loc,
                                                   meta.context_lens[D:], scale, meta.max_query_len, **scales))
            o = parts[0] if len(parts) == 1 else torch.cat(parts)
        return ops.linear(self.dense, o.reshape(o.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, config: QWenConfig, tp: int):
        super().__init__()
        ff = config.ffn_hidden_size // tp
        self.gate_up = nn.Linear(config.hidden_size, 2 * ff, bias=False)  # column-parallel: [w2 (gate) | w1 (up)]
        self.c_proj = nn.Linear(ff, config.hidden_size, bias=False)  # row-parallel

    def forward(self, x: Tensor, ops: Kernels) -> Tensor:
        """x [N, hidden] -> this rank's partial output [N, hidden] (the MLP output is the sum over ranks)."""
        return ops.linear(self.c_proj, ops.linear(self.gate_up, x), gated=True)


class Block(nn.Module):
    def __init__(self, config: QWenConfig, tp: int, layer: int):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = Attention(config, tp, layer)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = MLP(config, tp)


class QWen(nn.Module):
    """The QWen network for one tensor-parallel rank; state_dict names are the engine's weight names."""

    def __init__(self, config: QWenConfig, tp: int = 1):
        super().__init__()
        self.config, self.tp = config, tp
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, tp, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size // tp, bias=False)  # vocab-parallel
        self.ops = Kernels(triton=False, tp=tp)

    def set_kernels(self, triton: bool) -> QWen:
        """Fix the kernels of every layer: Triton, or plain PyTorch (weight-only layers included)."""
        self.ops = Kernels(triton, self.tp, self.embed.weight.device)
        for m in self.modules():
            if hasattr(m, "use_triton"):
                m.use_triton = triton
        return self

    def forward(self, input_ids: Tensor, meta: AttentionMetadata) -> Tensor:
        """input_ids [N] -> logits [S, vocab] (float32) at meta.logits_indices. Each residual add is fused into
        the next RMSNorm: rms_norm(x, w, eps, residual) returns (norm(x + residual) * w, x + residual), and with
        tensor parallelism the sum of the ranks' partial outputs comes first (all_reduce.rms_norm). Captured
        attention / mlp outputs are the sums at tp 1 only (at tp > 1 partials, or sums where NCCL reduced them in
        place; compare_layers runs tp 1)."""
        ops, cap = self.ops, meta.capture
        residual = self.embed(input_ids)
        if cap is not None:
            cap["embedding"] = residual
        h, _ = ops.rms_norm(residual, self.layers[0].ln_1.weight, self.layers[0].ln_1.eps)
        for i, layer in enumerate(self.layers):
            with nvtx_range(f"layer {i}"):
                a = layer.attn(h, meta, ops)
                h, residual = ops.all_reduce.rms_norm(a, layer.ln_2.weight, layer.ln_2.eps, residual, slot=0)
                m = layer.mlp(h, ops)
                if i + 1 < len(self.layers):
                    nxt = self.layers[i + 1].ln_1
                    h, residual_next = ops.all_reduce.rms_norm(m, nxt.weight, nxt.eps, residual, slot=1)
                else:
                    m = ops.all_reduce(m, slot=1)
                if cap is not None:
                    out = residual_next if i + 1 < len(self.layers) else (m.float() + residual.float()).to(m.dtype)
                    cap.update({f"layers.{i}.attention": a, f"layers.{i}.mlp": m, f"layers.{i}.output": out})
                if i + 1 < len(self.layers):
                    residual = residual_next
        idx = meta.logits_indices
        h, _ = ops.rms_norm(m[idx], self.ln_f.weight, self.ln_f.eps, residual=residual[idx])
        logits = ops.gather_vocab(ops.linear(self.lm_head, h)).float()
        if cap is not None:
            cap.update({"ln_f": h, "logits": logits})
        return logits
