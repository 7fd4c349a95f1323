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
from qwen_trtllm.models.qwen.weights import HF_PREFIX, lookup_hf, qwen2_tensors


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
    found = lookup_hf(name)
    if found is None:
        if name.startswith(HF_PREFIX):
            raise KeyError(name)  # a layer tensor outside the table
        return {}  # non-weight buffers such as rotary inv_freq
    w, layer = found
    if w.split == "qkv" and t.shape[0] != 3 * hidden:
        raise ValueError(f"{name} has {t.shape[0]} rows, expected 3 * hidden = {3 * hidden}")
    return qwen2_tensors(w, t, layer)  # c_attn rows q | k | v -> q_proj, k_proj, v_proj; w2 -> gate, w1 -> up


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
