"""Qwen (v1) in PyTorch, for inference with a static KV cache.

Implements the network of Qwen-7B (Bai et al., "Qwen Technical Report", 2023) as Qwen's own modeling_qwen.py
computes it: pre-RMSNorm blocks, fused QKV projection with bias, NeoX rotate-half rotary embeddings computed in
float32, causal attention, SwiGLU MLP c_proj(w1(x) * silu(w2(x))) (w2 is the gated branch), untied lm_head.
Beyond the trained context (seq_length) it applies Qwen's two extensions: dynamic NTK-aware rotary scaling
(the base grows with the prompt length, fixed per sequence for its generated tokens) and logn attention scaling
of the queries. Linear layers are tensor-parallel aware (column/row split + one all-reduce per sub-block).

Decode steps can run through the Triton kernels in qwen_trtllm.kernels (fused residual+RMSNorm, rotary+KV write,
flash-decoding attention, SiLU*mul); the plain PyTorch path is the reference and the CPU path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from qwen_trtllm.config import QWenConfig
from qwen_trtllm.profiling import nvtx_range


def ntk_alpha(prompt_len: int, seq_length: int) -> float:
    """Qwen's dynamic NTK alpha for a prompt of prompt_len tokens: 1 inside the trained context."""
    context_value = math.log(prompt_len / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context_value) - 1, 1))


def rotary_inv_freq(config: QWenConfig, alpha: Tensor) -> Tensor:
    """Per-sequence inverse frequencies [B, rotary_dim // 2] (float32) for NTK alphas [B]."""
    d = config.rotary_dim
    base = config.rotary_emb_base * alpha.double() ** (d / (d - 2))
    exponent = torch.arange(0, d, 2, device=alpha.device, dtype=torch.float32) / d
    return (1.0 / (base.float()[:, None] ** exponent[None, :])).float()


def logn_scale(positions: Tensor, seq_length: int) -> Tensor:
    """Qwen's logn attention factor for 0-based positions: ln(p+1)/ln(seq_length) beyond seq_length, else 1."""
    p1 = (positions + 1).float()
    return torch.where(p1 > seq_length, torch.log(p1) / math.log(seq_length), torch.ones_like(p1))


@dataclass
class StepContext:
    """Everything one forward pass needs besides the tokens; built by the runtime, shared by all layers.

    prefill: positions 0..T-1 of right-padded prompts (real tokens never attend to padding under the causal mask).
    decode: one token per sequence at positions[b]; seq_lens = positions + 1 keys are valid afterwards.
    """

    positions: Tensor  # [B, T] int64
    inv_freq: Tensor  # [B, rotary_dim // 2] float32
    k_cache: Tensor  # [layers, max_batch, heads, max_seq, head_dim]
    v_cache: Tensor
    prefill: bool
    seq_lens: Tensor | None = None  # decode: [B] int32 valid keys after this step's write
    attn_len: int = 0  # decode, PyTorch path: cache slots to attend over (static for CUDA graphs)
    use_triton: bool = False
    capture: dict | None = None  # when a dict, blocks store named intermediate outputs in it

    def __post_init__(self) -> None:
        angles = self.positions.float()[..., None] * self.inv_freq[:, None, :]  # [B, T, rd/2]
        self.cos, self.sin = angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """NeoX rotate-half on the first rotary dims of x [B, heads, T, D], in float32, cast back."""
    rd = cos.shape[-1] * 2
    xf, x_pass = x.float()[..., :rd], x[..., rd:]
    x1, x2 = xf.chunk(2, dim=-1)
    c, s = cos[:, None], sin[:, None]  # [B, 1, T, rd/2]
    rot = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
    return torch.cat((rot, x_pass), dim=-1) if x_pass.numel() else rot


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def project(layer: nn.Module, x: Tensor, fast: bool) -> Tensor:
    """A linear layer; on the fused decode path plain nn.Linear layers go through the Triton GEMV."""
    if fast and type(layer) is nn.Linear:
        from qwen_trtllm.kernels.gemv import linear

        return linear(x, layer.weight, layer.bias)
    return layer(x)


def all_reduce(x: Tensor, tp: int) -> Tensor:
    """Sum the row-parallel partial outputs over the tensor-parallel ranks (a no-op at tp = 1)."""
    if tp > 1:
        dist.all_reduce(x)
    return x


class Attention(nn.Module):
    def __init__(self, config: QWenConfig, tp: int, layer: int):
        super().__init__()
        self.heads, self.head_dim, self.tp, self.layer = config.num_attention_heads // tp, config.kv_channels, tp, layer
        self.config = config
        width = self.heads * self.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * width, bias=True)  # column-parallel: [q_r | k_r | v_r]
        self.dense = nn.Linear(width, config.hidden_size, bias=False)  # row-parallel

    def forward(self, x: Tensor, ctx: StepContext) -> Tensor:
        B, T, _ = x.shape
        qkv = project(self.qkv, x, ctx.use_triton)
        kc, vc = ctx.k_cache[self.layer], ctx.v_cache[self.layer]
        logn_len = self.config.seq_length if self.config.use_logn_attn else 0
        if ctx.use_triton:  # rotary + logn + KV-cache write in one kernel, then flash attention
            from qwen_trtllm.kernels import decode_attention, rotary_kv_write

            rope = (self.heads, self.head_dim, self.config.rotary_dim, logn_len)
            if ctx.prefill:
                rows = torch.arange(B, device=x.device).repeat_interleave(T)
                q = rotary_kv_write(qkv.view(B * T, -1), ctx.inv_freq, ctx.positions.reshape(-1), kc, vc, *rope,
                                    batch_index=rows).view(B, T, self.heads, self.head_dim).transpose(1, 2)
                o = F.scaled_dot_product_attention(q, kc[:B, :, :T], vc[:B, :, :T], is_causal=True).transpose(1, 2)
            else:
                q = rotary_kv_write(qkv.view(B, -1), ctx.inv_freq, ctx.positions[:, 0], kc, vc, *rope)
                o = decode_attention(q, kc, vc, ctx.seq_lens, 1.0 / math.sqrt(self.head_dim))
            return all_reduce(project(self.dense, o.reshape(B, T, -1), True), self.tp)

        q, k, v = qkv.view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each [B, heads, T, D]
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if logn_len:
            q = (q.float() * logn_scale(ctx.positions, logn_len)[:, None, :, None]).to(q.dtype)
        if ctx.prefill:
            kc[:B, :, :T], vc[:B, :, :T] = k, v
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # one new token per sequence, written at its own position
            rows = torch.arange(B, device=x.device)
            kc[rows, :, ctx.positions[:, 0]], vc[rows, :, ctx.positions[:, 0]] = k[:, :, 0], v[:, :, 0]
            n = ctx.attn_len
            mask = torch.arange(n, device=x.device)[None, :] < ctx.seq_lens[:, None]  # [B, n]
            o = F.scaled_dot_product_attention(q, kc[:B, :, :n], vc[:B, :, :n], attn_mask=mask[:, None, None, :])
        return all_reduce(self.dense(o.transpose(1, 2).reshape(B, T, -1)), self.tp)


class MLP(nn.Module):
    def __init__(self, config: QWenConfig, tp: int):
        super().__init__()
        self.tp, ff = tp, config.ffn_hidden_size // tp
        self.gate_up = nn.Linear(config.hidden_size, 2 * ff, bias=False)  # column-parallel: [w2 (gate) | w1 (up)]
        self.c_proj = nn.Linear(ff, config.hidden_size, bias=False)  # row-parallel

    def forward(self, x: Tensor, use_triton: bool = False) -> Tensor:
        gu = project(self.gate_up, x, use_triton)
        if use_triton and type(self.c_proj) is nn.Linear:  # SiLU*mul fused into c_proj (GEMV) or before it
            from qwen_trtllm.kernels.gemv import linear

            return all_reduce(linear(gu, self.c_proj.weight, gated=True), self.tp)
        if use_triton:  # weight-only c_proj: a fused SiLU there would be recomputed by every output tile
            from qwen_trtllm.kernels import silu_mul

            return all_reduce(self.c_proj(silu_mul(gu)), self.tp)
        gate, up = gu.chunk(2, dim=-1)
        return all_reduce(self.c_proj(up * F.silu(gate)), self.tp)


class Block(nn.Module):
    def __init__(self, config: QWenConfig, tp: int, layer: int):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = Attention(config, tp, layer)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = MLP(config, tp)

    def forward(self, x: Tensor, ctx: StepContext) -> Tensor:
        a = self.attn(self.ln_1(x), ctx)
        x = x + a
        m = self.mlp(self.ln_2(x))
        if ctx.capture is not None:
            i = self.attn.layer
            ctx.capture.update({f"layers.{i}.attention": a, f"layers.{i}.mlp": m, f"layers.{i}.output": x + m})
        return x + m


class QWen(nn.Module):
    """The QWen network for one tensor-parallel rank; state_dict names are the engine's weight names."""

    def __init__(self, config: QWenConfig, tp: int = 1):
        super().__init__()
        self.config, self.tp = config, tp
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, tp, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, tokens: Tensor, ctx: StepContext, last_only: Tensor | None = None) -> Tensor:
        """tokens [B, T] -> logits [B, T, V] in float32; last_only [B] picks one position per row ([B, 1, V])."""
        if ctx.use_triton:
            return self._forward_fused(tokens, ctx, last_only)
        x = self.embed(tokens)
        if ctx.capture is not None:
            ctx.capture["embedding"] = x
        for i, layer in enumerate(self.layers):
            with nvtx_range(f"layer {i}"):
                x = layer(x, ctx)
        if last_only is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last_only][:, None]
        x = self.ln_f(x)
        logits = self.lm_head(x).float()
        if ctx.capture is not None:
            ctx.capture.update({"ln_f": x, "logits": logits})
        return logits

    def _forward_fused(self, tokens: Tensor, ctx: StepContext, last_only: Tensor | None) -> Tensor:
        """The forward pass through the Triton kernels: each residual add is fused into the next RMSNorm."""
        from qwen_trtllm.kernels import rms_norm

        residual = self.embed(tokens)
        h, _ = rms_norm(residual, self.layers[0].ln_1.weight, self.layers[0].ln_1.eps)
        for i, layer in enumerate(self.layers):
            with nvtx_range(f"layer {i}"):
                a = layer.attn(h, ctx)
                h, residual = rms_norm(a, layer.ln_2.weight, layer.ln_2.eps, residual=residual)
                m = layer.mlp(h, use_triton=True)
                if i + 1 < len(self.layers):
                    nxt = self.layers[i + 1].ln_1
                    h, residual = rms_norm(m, nxt.weight, nxt.eps, residual=residual)
        if last_only is not None:
            rows = torch.arange(tokens.shape[0], device=tokens.device)
            m, residual = m[rows, last_only][:, None], residual[rows, last_only][:, None]
        h, _ = rms_norm(m, self.ln_f.weight, self.ln_f.eps, residual=residual)
        return project(self.lm_head, h, True).float()
