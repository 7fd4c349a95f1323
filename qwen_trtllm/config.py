"""The Qwen (v1) model configuration: read from Hugging Face config.json (both generations), written to and
read from FT config.ini and the engine's config.json."""

from __future__ import annotations

import configparser
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from qwen_trtllm import QWenError

# Keys of Qwen v1 config.json files (v1.1 and the August-2023 v1.0) that carry no meaning for inference.
_IGNORED_HF_KEYS = {
    "_name_or_path", "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "tokenizer_class", "tokenizer_type",
    "initializer_range", "attn_dropout_prob", "emb_dropout_prob", "attn_pdrop", "embd_pdrop", "resid_pdrop",
    "bf16", "fp16", "fp32", "use_flash_attn", "softmax_in_fp32", "use_cache_quantization", "use_cache_kernel",
    "onnx_safe", "scale_attn_weights", "params_dtype", "pos_emb", "activation", "bias_dropout_fusion",
    "apply_residual_connection_post_layernorm", "no_bias", "tie_word_embeddings", "n_positions",
    "vocab_size", "padded_vocab_size", "ffn_hidden_size", "n_embd", "n_head", "n_layer",
    "quantization_config",  # GPTQ checkpoints (Qwen-*-Int4): read from quantize_config.json by checkpoint/gptq.py
}
# v1.0 name -> v1.1 name
_V10_ALIASES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
                "ffn_hidden_size": "intermediate_size"}


@dataclass
class QWenConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_channels: int
    intermediate_size: int  # Hugging Face meaning: w1 and w2 together; each is intermediate_size // 2 wide
    seq_length: int  # the trained context; dynamic NTK and logn attention act beyond it
    max_position_embeddings: int
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    layer_norm_epsilon: float = 1e-6
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def ffn_hidden_size(self) -> int:
        """Width of one MLP branch (w1 or w2)."""
        return self.intermediate_size // 2

    @property
    def rotary_dim(self) -> int:
        return int(self.kv_channels * self.rotary_pct)

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels",
                  "intermediate_size", "seq_length", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise QWenError(f"config value {f}={v!r} must be a positive integer")
        if self.num_attention_heads * self.kv_channels != self.hidden_size:
            raise QWenError(f"num_attention_heads*kv_channels ({self.num_attention_heads}*{self.kv_channels}) "
                            f"!= hidden_size ({self.hidden_size}): not a Qwen (v1) config")
        if self.intermediate_size % 2:
            raise QWenError(f"intermediate_size={self.intermediate_size} must be even (w1 and w2 are half each)")
        if self.rotary_dim % 2 or not 0 < self.rotary_pct <= 1:
            raise QWenError(f"rotary_pct={self.rotary_pct} must give an even rotary dim within kv_channels")

    def check_tensor_parallel(self, tp: int) -> None:
        if tp < 1 or self.num_attention_heads % tp or self.ffn_hidden_size % tp or self.vocab_size % tp:
            raise QWenError(f"tensor parallelism {tp} must divide num_attention_heads "
                            f"({self.num_attention_heads}), the MLP width ({self.ffn_hidden_size}) and the "
                            f"vocabulary ({self.vocab_size}, lm_head's rows); choose a divisor such as 1, 2 or 4")

    # --- Hugging Face config.json -------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict) -> QWenConfig:
        if d.get("model_type", "qwen") != "qwen":
            raise QWenError(f"config.json has model_type={d.get('model_type')!r}; this port reads Qwen (v1) "
                            "checkpoints (model_type 'qwen'), e.g. Qwen/Qwen-7B-Chat")
        known = _IGNORED_HF_KEYS | {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QWenError(f"unknown config keys in config.json: {', '.join(unknown)}; "
                            "this converter reads Qwen (v1) checkpoints only")
        if d.get("tie_word_embeddings"):
            raise QWenError("config.json sets tie_word_embeddings=true; Qwen (v1) has a separate lm_head")
        v = dict(d)
        for old, new in _V10_ALIASES.items():
            if old in v and new not in v:
                v[new] = v[old]
        if "padded_vocab_size" in v:  # v1.0: the embedding has padded_vocab_size rows
            v["vocab_size"] = v["padded_vocab_size"]
        v.setdefault("max_position_embeddings", v.get("n_positions", v.get("seq_length")))
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size", "seq_length") if k not in v]
        if missing:
            raise QWenError(f"config.json lacks {', '.join(missing)}: not a Qwen (v1) checkpoint config")
        v.setdefault("kv_channels", v["hidden_size"] // v["num_attention_heads"])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v[k] for k in names if k in v})

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> QWenConfig:
        p = Path(path) / "config.json"
        if not p.is_file():
            raise QWenError(f"{p} not found: pass a Hugging Face Qwen checkpoint directory")
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise QWenError(f"{p} is not valid JSON ({e})") from None
        return cls.from_hf_dict(d)

    # --- plain dicts (engine config.json) and FT config.ini ------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QWenConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise QWenError(f"unknown model config keys: {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise QWenError(f"incomplete model config: {e}") from None

    @classmethod
    def from_ini_section(cls, section: configparser.SectionProxy) -> QWenConfig:
        out = {}
        for f in dataclasses.fields(cls):
            if f.name not in section:
                raise QWenError(f"config.ini lacks '{f.name}': re-run hf_qwen_convert.py")
            raw = section[f.name]
            if f.type in ("int", int):
                out[f.name] = int(raw)
            elif f.type in ("float", float):
                out[f.name] = float(raw)
            elif f.type in ("bool", bool):
                out[f.name] = section.getboolean(f.name)
            else:
                out[f.name] = raw
        return cls(**out)
