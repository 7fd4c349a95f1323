"""Random Qwen (v1) checkpoints in the exact Hugging Face layout, for tests, the demo and GPU benchmarks.

Every test, the demo and the GPU benchmarks build on these (no real weights needed);
examples/qwen/make_random_checkpoint.py writes one for trying the workflow. Both config generations (v1.1 and the
August-2023 v1.0) and the three weight layouts of the Hub are written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen_trtllm.cli import give_default_mode
from qwen_trtllm.logger import progress
from qwen_trtllm.models.qwen.weights import hf_shapes

# Shapes of the released Qwen (v1) models, plus tiny ones for the CPU: "tiny" (a 1024-token vocabulary: token ids
# only) and "tiny-chat" (Qwen's 151936-token vocabulary, so the real qwen.tiktoken works: the demo's).
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
                 intermediate_size=352, seq_length=64, max_position_embeddings=256),
    "tiny-chat": dict(vocab_size=151936, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
                      intermediate_size=256, seq_length=8192, max_position_embeddings=8192),
    "qwen-1.8b": dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                      kv_channels=128, intermediate_size=11008, seq_length=8192, max_position_embeddings=8192),
    "qwen-7b": dict(vocab_size=151936, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                    kv_channels=128, intermediate_size=22016, seq_length=8192, max_position_embeddings=8192),
    "qwen-14b": dict(vocab_size=152064, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                     kv_channels=128, intermediate_size=27392, seq_length=2048, max_position_embeddings=8192),
    "qwen-72b": dict(vocab_size=152064, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                     kv_channels=128, intermediate_size=49152, seq_length=32768, max_position_embeddings=32768),
}

GENERATION_CONFIG = {  # Qwen-7B-Chat's generation_config.json (the current one, with max_window_size)
    "chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144,
    "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1,
    "transformers_version": "4.31.0",
}


def hf_config(shape: dict, generation: str = "v1.1") -> dict:
    """A config.json dict as Qwen ships it: 'v1.1' (Qwen-7B-Chat today) or 'v1.0' (August 2023)."""
    common = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "model_type": "qwen", "kv_channels": shape["kv_channels"], "layer_norm_epsilon": 1e-6,
        "rotary_emb_base": shape.get("rotary_emb_base", 10000), "rotary_pct": 1.0,
        "seq_length": shape["seq_length"], "use_dynamic_ntk": True, "use_logn_attn": True,
        "scale_attn_weights": True, "no_bias": True, "tie_word_embeddings": False, "use_cache": True,
        "use_flash_attn": "auto", "bf16": False, "fp16": False, "fp32": False, "onnx_safe": None,
        "initializer_range": 0.02, "transformers_version": "4.32.0",
    }
    if generation == "v1.1":
        return {**common, "hidden_size": shape["hidden_size"], "num_hidden_layers": shape["num_hidden_layers"],
                "num_attention_heads": shape["num_attention_heads"],
                "intermediate_size": shape["intermediate_size"], "vocab_size": shape["vocab_size"],
                "max_position_embeddings": shape["max_position_embeddings"], "attn_dropout_prob": 0.0,
                "emb_dropout_prob": 0.0, "softmax_in_fp32": False, "tokenizer_class": "QWenTokenizer"}
    if generation == "v1.0":
        return {**common, "n_embd": shape["hidden_size"], "n_layer": shape["num_hidden_layers"],
                "n_head": shape["num_attention_heads"], "ffn_hidden_size": shape["intermediate_size"],
                "padded_vocab_size": shape["vocab_size"], "vocab_size": shape["vocab_size"],
                "n_positions": shape["max_position_embeddings"], "params_dtype": "torch.bfloat16",
                "pos_emb": "rotary", "apply_residual_connection_post_layernorm": False,
                "bias_dropout_fusion": True, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.1,
                "tokenizer_type": "QWenTokenizer"}
    raise ValueError(f"unknown config generation {generation!r}: use 'v1.1' or 'v1.0'")


def hf_tensor_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor of a Hugging Face Qwen (v1) checkpoint, in file order."""
    return hf_shapes(shape["hidden_size"], shape["vocab_size"], shape["intermediate_size"] // 2,
                     shape["num_hidden_layers"])


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, device: str) -> torch.Tensor:
    """Weights scaled like a trained model's so activations stay O(1) through many layers."""
    if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
    if name.endswith(".bias"):
        return 0.1 * torch.randn(shape, generator=gen, device=device)
    std = 1.0 if name == "transformer.wte.weight" else shape[-1] ** -0.5
    return std * torch.randn(shape, generator=gen, device=device)


def write_random_checkpoint(out_dir: str | Path, preset: str | dict = "tiny", *, generation: str = "v1.1",
                            layout: str = "safetensors-sharded", dtype: torch.dtype = torch.float32,
                            seed: int = 0, tokenizer_file: str | Path | None = None, device: str = "cpu",
                            shard_bytes: int = 2 << 30, **overrides) -> Path:
    """Write a random Qwen (v1) checkpoint. layout: 'safetensors-sharded' (+ index), 'safetensors' (one
    model.safetensors) or 'bin-sharded' (pytorch_model-*.bin + index). tokenizer_file: a qwen.tiktoken to copy."""
    shape = {**(PRESETS[preset] if isinstance(preset, str) else preset), **overrides}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(shape, generation), indent=2))
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": shape["max_position_embeddings"], "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}, indent=2))
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, out / "qwen.tiktoken")

    gen = torch.Generator(device=device).manual_seed(seed)
    itemsize = torch.finfo(dtype).bits // 8
    plan: list[list[tuple[str, tuple[int, ...]]]] = [[]]  # shards planned from the shapes: one in RAM at a time
    size = 0
    for name, shp in hf_tensor_shapes(shape).items():
        nbytes = itemsize * int(torch.Size(shp).numel())
        if size and size + nbytes > shard_bytes and layout != "safetensors":
            plan.append([])
            size = 0
        plan[-1].append((name, shp))
        size += nbytes
    ext, stem, index = {"safetensors": ("safetensors", "model", None),
                        "safetensors-sharded": ("safetensors", "model", "model.safetensors.index.json"),
                        "bin-sharded": ("bin", "pytorch_model", "pytorch_model.bin.index.json")}[layout]
    weight_map, total = {}, 0
    bar = progress(len(plan), f"writing random weights to {out}", unit="files")
    for k, names in enumerate(plan):
        shard = {n: random_tensor(n, shp, gen, device).to(dtype).cpu().contiguous() for n, shp in names}
        fname = f"{stem}.{ext}" if index is None else f"{stem}-{k + 1:05d}-of-{len(plan):05d}.{ext}"
        if ext == "safetensors":
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            give_default_mode(out / fname)
        else:
            torch.save(shard, out / fname)
        weight_map.update({n: fname for n in shard})
        total += sum(t.nbytes for t in shard.values())
        del shard
        bar.update(1)
    bar.close()
    if index is not None:
        (out / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def swap_mlp_weights(src: str | Path, dst: str | Path, layer: int) -> Path:
    """A copy of a safetensors checkpoint with mlp.w1 and mlp.w2 of one layer exchanged: the classic Qwen port
    bug, planted to show that summarize.py and compare_layers.py catch it."""
    from safetensors.torch import load_file

    dst = Path(dst)
    shutil.copytree(src, dst)
    names = (f"transformer.h.{layer}.mlp.w1.weight", f"transformer.h.{layer}.mlp.w2.weight")
    for f in dst.glob("*.safetensors"):
        t = load_file(str(f))
        if names[0] in t:
            t[names[0]], t[names[1]] = t[names[1]], t[names[0]]
            save_file(t, str(f), metadata={"format": "pt"})
            give_default_mode(f)
    return dst
