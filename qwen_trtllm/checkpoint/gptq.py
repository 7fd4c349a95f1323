"""Qwen's official GPTQ checkpoints (Qwen-7B-Chat-Int4 layout, AutoGPTQ format) -> the int4 engine's weights.

Per quantised linear the checkpoint holds qweight (int32 [in/8, out], eight 4-bit values along the input axis,
value j in bits 4j..4j+3), qzeros (int32 [in/group, out/8], packed along the output axis, stored as zero - 1),
scales (fp16 [in/group, out]) and g_idx (int32 [in]); w[k, n] = scales[g, n] * (q[k, n] - zero[g, n]) with
g = g_idx[k]. The engine's int4 is symmetric with groups of consecutive inputs (value - 8) * scale, which is
exactly GPTQ with sym=True and desc_act=False (zero 8, g_idx = k // group); other checkpoints are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from qwen_trtllm import QWenError
from qwen_trtllm.checkpoint.hf_checkpoint import HFCheckpoint
from qwen_trtllm.config import QWenConfig
from qwen_trtllm.models.qwen.weights import HF_LINEARS, LAYER_WEIGHTS, Weight, fuse, iter_weights

LINEARS = HF_LINEARS  # ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
_SHIFTS = torch.arange(8, dtype=torch.int32) * 4


def is_gptq_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "quantize_config.json").is_file()


def gptq_group_size(path: str | Path) -> int:
    cfg_path = Path(path) / "quantize_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise QWenError(f"{cfg_path} is unreadable ({e})") from None
    if cfg.get("bits") != 4 or cfg.get("desc_act") or not cfg.get("sym", True):
        raise QWenError(f"{cfg_path}: only 4-bit, sym=true, desc_act=false GPTQ checkpoints (Qwen-*-Int4) map onto "
                        f"this engine's int4; got bits={cfg.get('bits')} sym={cfg.get('sym')} "
                        f"desc_act={cfg.get('desc_act')}")
    return int(cfg.get("group_size", 128))


def unpack_gptq(qweight: Tensor, qzeros: Tensor, g_idx: Tensor, group_size: int, name: str) -> Tensor:
    """int values q - zero in [-8, 7], shape [out, in], after checking the layout is symmetric and ordered."""
    k8, n = qweight.shape
    q = ((qweight.to(torch.int32)[:, None, :] >> _SHIFTS[None, :, None]) & 0xF).reshape(k8 * 8, n)
    zeros = ((qzeros.to(torch.int32)[:, :, None] >> _SHIFTS[None, None, :]) & 0xF).reshape(qzeros.shape[0], -1) + 1
    if not torch.equal(g_idx.to(torch.int64), torch.arange(k8 * 8) // group_size):
        raise QWenError(f"{name}: g_idx is not k // {group_size} (an act-order GPTQ checkpoint); re-quantise with "
                        "desc_act=false")
    if not (zeros == 8).all():
        raise QWenError(f"{name}: GPTQ zero points other than 8 (an asymmetric checkpoint); this engine's int4 is "
                        "symmetric")
    return (q - 8).t().contiguous()


def runtime_weights_from_gptq(ckpt: HFCheckpoint, config: QWenConfig, group_size: int) -> dict[str, Tensor]:
    """The int4 engine's state dict (tp 1): qweight uint8 [out, in/2], scales fp16 [out, in/group] (gate_up fused
    [w2 | w1] before packing), fp16 rest."""
    from qwen_trtllm.quantization import pack_int4

    def linear(prefix: str) -> tuple[Tensor, Tensor]:
        q = unpack_gptq(ckpt.get(prefix + ".qweight"), ckpt.get(prefix + ".qzeros"), ckpt.get(prefix + ".g_idx"),
                        group_size, prefix)
        return q, ckpt.get(prefix + ".scales").to(torch.float16).t().contiguous()

    def is_linear(w: Weight) -> bool:
        return w.hf.removesuffix(".weight") in LINEARS

    out = fuse((w, w.engine_name(i), ckpt.get(w.hf_name(i)))
               for w, i in iter_weights(config.num_hidden_layers) if not is_linear(w))
    for i in range(config.num_hidden_layers):  # one layer's unpacked int values in memory at a time
        layer = [(w, w.engine_name(i).removesuffix(".weight"), linear(w.hf_name(i).removesuffix(".weight")))
                 for w in LAYER_WEIGHTS if is_linear(w)]  # engine module name, (q, scales)
        out.update({f"{n}.qweight": pack_int4(q) for n, q in fuse((w, n, q) for w, n, (q, _) in layer).items()})
        out.update({f"{n}.scales": s for n, s in fuse((w, n, s) for w, n, (_, s) in layer).items()})
    return out


def write_gptq_checkpoint(src: str | Path, dst: str | Path, group_size: int = 128) -> Path:
    """A synthetic GPTQ checkpoint in Qwen-7B-Chat-Int4's layout, quantised (symmetric, AutoGPTQ packing) from a
    floating-point Qwen checkpoint; for tests of the loader. Other tensors are copied as fp16."""
    import shutil

    from safetensors.torch import save_file

    from qwen_trtllm.cli import give_default_mode
    from qwen_trtllm.quantization import quantize_int4, unpack_int4

    ckpt, dst = HFCheckpoint(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "generation_config.json", "tokenizer_config.json", "qwen.tiktoken"):
        if (Path(src) / f).is_file():
            shutil.copyfile(Path(src) / f, dst / f)
    (dst / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": group_size, "damp_percent": 0.01,
                                                          "desc_act": False, "static_groups": False, "sym": True,
                                                          "true_sequential": True}))
    tensors = {}
    for name in ckpt.expected_shapes():
        prefix = name.rsplit(".", 1)[0]
        if any(prefix.endswith(lin) for lin in LINEARS) and name.endswith(".weight"):
            packed, scales, _ = quantize_int4(ckpt.get(name).to(torch.float16).float(), group_size)  # as from fp16
            q = (unpack_int4(packed).to(torch.int32) + 8).t()  # [in, out], 0..15 with zero 8
            k, n = q.shape
            tensors[prefix + ".qweight"] = (q.reshape(k // 8, 8, n) << _SHIFTS[None, :, None]).sum(1, dtype=torch.int32)
            zeros = torch.full((k // group_size, n), 7, dtype=torch.int32)  # AutoGPTQ stores zero - 1
            tensors[prefix + ".qzeros"] = (zeros.reshape(-1, n // 8, 8) << _SHIFTS).sum(-1, dtype=torch.int32)
            tensors[prefix + ".scales"] = scales.t().contiguous()
            tensors[prefix + ".g_idx"] = torch.arange(k, dtype=torch.int32) // group_size
        else:
            tensors[name] = ckpt.get(name).to(torch.float16).contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    give_default_mode(dst / "model.safetensors")
    return dst
