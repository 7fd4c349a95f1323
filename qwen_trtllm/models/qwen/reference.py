"""The independent Hugging Face reference: a Qwen (v1) checkpoint mapped into transformers' Qwen2ForCausalLM.

No trust_remote_code (Qwen's 2023 remote code does not run under transformers 5). The mapping is exact for
contexts up to seq_length; beyond it Qwen (v1) applies dynamic NTK and logn attention, which Qwen2 lacks, so the
reference is only used on contexts <= seq_length.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from qwen_trtllm.config import QWenConfig


def qwen2_config(config: QWenConfig) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_attention_heads,
        head_dim=config.kv_channels, max_position_embeddings=config.max_position_embeddings,
        rope_theta=float(config.rotary_emb_base), rms_norm_eps=config.layer_norm_epsilon,
        tie_word_embeddings=False, use_sliding_window=False, attention_dropout=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)


def map_qwen_to_qwen2(name: str, t: torch.Tensor, hidden: int) -> dict[str, torch.Tensor]:
    """One Hugging Face Qwen (v1) tensor -> the Qwen2ForCausalLM tensors it becomes."""
    if name == "transformer.wte.weight":
        return {"model.embed_tokens.weight": t}
    if name == "transformer.ln_f.weight":
        return {"model.norm.weight": t}
    if name == "lm_head.weight":
        return {"lm_head.weight": t}
    if not name.startswith("transformer.h."):
        return {}  # non-weight buffers such as rotary inv_freq
    i, rest = name[len("transformer.h."):].split(".", 1)
    p = f"model.layers.{i}."
    if rest.startswith("attn.c_attn."):
        kind = rest.rsplit(".", 1)[1]  # weight or bias: rows are q | k | v
        q, k, v = t.split(hidden, dim=0)
        return {p + f"self_attn.q_proj.{kind}": q, p + f"self_attn.k_proj.{kind}": k,
                p + f"self_attn.v_proj.{kind}": v}
    return {p + {"ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight",
                 "attn.c_proj.weight": "self_attn.o_proj.weight", "mlp.w2.weight": "mlp.gate_proj.weight",
                 "mlp.w1.weight": "mlp.up_proj.weight", "mlp.c_proj.weight": "mlp.down_proj.weight"}[rest]: t}


def load_reference(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> Qwen2ForCausalLM:
    """The checkpoint as a transformers Qwen2ForCausalLM (eval mode), weights cast to dtype on device."""
    from qwen_trtllm.checkpoint.hf_checkpoint import HFCheckpoint

    ckpt = HFCheckpoint(checkpoint_dir)
    ckpt.validate()
    state = {}
    for name in ckpt.expected_shapes():
        state.update(map_qwen_to_qwen2(name, ckpt.get(name).to(device=device, dtype=dtype),
                                       ckpt.config.hidden_size))
    return qwen2_from_state(ckpt.config, state, device)


def qwen2_from_state(config: QWenConfig, state: dict[str, torch.Tensor],
                     device: str | torch.device) -> Qwen2ForCausalLM:
    """A Qwen2ForCausalLM (eval mode) that uses the given tensors as its weights, without copying them."""
    cfg = qwen2_config(config)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg).to(device)  # its buffers were on meta
    return model.eval()
