"""Layer-by-layer comparison of the engine with the Hugging Face reference, to find WHERE a port goes wrong.

The same tokens go through the engine's prefill (one prefill step of the model runner on the kernels it ships with;
the model stores its intermediate outputs in AttentionMetadata.capture) and through transformers'
Qwen2ForCausalLM with forward hooks. Every captured tensor is compared in network order; the first one over
tolerance is where the bug is (everything after it inherits it).

Default tolerances on the relative error ||engine - ref|| / ||ref|| of one tensor, by the engine's dtype (engine
vs a float32 reference; measured on CPU with a random 12-layer, hidden-1024 model and 128 tokens):
  float32  1e-4  a correct port differs only by summation order (~1e-6; bitwise 0 on the tiny test model), while a
                 real bug (a wrong weight, layout or rotary convention) gives 1e-2..1: two orders of margin each way.
  float16  2e-2  unit roundoff 4.9e-4; every GEMM input/output is rounded and the residual stream carries earlier
                 layers' errors: measured <= 2.8e-3 on any tensor, growing slowly with depth. 2e-2 is ~7x that.
  bfloat16 5e-2  unit roundoff 3.9e-3, eight times fp16's: measured <= 2.2e-2 (logits 1.6e-2), so 5e-2 (~2x).
A bug still shows as a jump at one tensor; trained models with outlier activations may need --rtol.
The weights' precision counts as well as the compute dtype: an engine's tolerance is that of the coarsest of its
dtype, the dtype it was built with (its weights are stored so, whatever --engine_dtype runs them in) and the
storage type of the FT files it was built from (recorded in config.json's build.source.storage_dtype): a float32
engine built from float16 FT files gets float16's, since the rounding of its stored weights (2-3e-4 on the
embedding already) is no bug.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from qwen_trtllm import QWenError
from qwen_trtllm.models.qwen.model import sequence_ntk_alpha

DEFAULT_TOLERANCES = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def default_tolerance(dtype: torch.dtype) -> float:
    """The relative-error tolerance for an engine running in dtype (see the module doc)."""
    return DEFAULT_TOLERANCES[dtype]


def engine_tolerance(engine) -> float:
    """The tolerance of the coarsest of the engine's running dtype, its build dtype and the storage type of the FT
    files it was built from (engines built from a Hugging Face checkpoint, or before that record: the dtypes)."""
    from qwen_trtllm.builder.engine_format import DTYPES

    names = (engine.build.dtype, engine.build.source.get("storage_dtype"))
    return max([default_tolerance(engine.dtype)] + [default_tolerance(DTYPES[n]) for n in names if n in DTYPES])


def tensor_names(num_layers: int) -> list[str]:
    """Captured tensor names in network order."""
    names = ["embedding"]
    for i in range(num_layers):
        names += [f"layers.{i}.attention", f"layers.{i}.mlp", f"layers.{i}.output"]
    return names + ["ln_f", "logits"]


@dataclass
class LayerDiff:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    rel_err: float  # ||engine - ref|| / ||ref||
    cosine: float
    tol: float

    @property
    def flagged(self) -> bool:
        return not self.rel_err <= self.tol  # NaN counts as over tolerance


@torch.inference_mode()
def engine_intermediates(engine, token_ids: Sequence[int]) -> dict[str, Tensor]:
    """One prefill of token_ids through the path the engine ships (the model runner's prefill step with the
    engine's own kernels, on a KV cache of its own), returning its captured tensors [T, ...]."""
    if engine.world_size != 1:
        raise QWenError("compare_layers runs a single-rank engine: rebuild it with --world_size 1")
    from qwen_trtllm.runtime.executor import Executor, ExecutorConfig
    from qwen_trtllm.runtime.kv_cache import KvCacheConfig
    from qwen_trtllm.runtime.model_runner import StepPlan

    T, cfg = len(token_ids), engine.config
    tpb = engine.build.tokens_per_block
    kv = KvCacheConfig(max_tokens=-(-T // tpb) * tpb, tokens_per_block=tpb)  # exactly this prompt's blocks
    executor = Executor(engine, ExecutorConfig(max_batch_size=1, max_seq_len=T, kv_cache=kv, cuda_graphs=False))
    blocks: list[int] = []
    executor.kv_cache.grow(blocks, T)
    plan = StepPlan.prefill([list(token_ids)], [blocks], [sequence_ntk_alpha(cfg, T)])
    capture: dict[str, Tensor] = {}
    try:
        executor.runner.forward_plan(plan, capture=capture, all_logits=True)
    finally:
        executor.kv_cache.free(blocks)
    return capture


@torch.inference_mode()
def reference_intermediates(model, token_ids: Sequence[int]) -> dict[str, Tensor]:
    """The same tensors from a transformers Qwen2ForCausalLM, through forward hooks."""
    out: dict[str, Tensor] = {}
    first = lambda o: o[0] if isinstance(o, tuple | list) else o
    hook = lambda name: (lambda _m, _args, o: out.__setitem__(name, first(o)[0]))
    mods = [("embedding", model.model.embed_tokens)]
    for i, layer in enumerate(model.model.layers):
        mods += [(f"layers.{i}.attention", layer.self_attn), (f"layers.{i}.mlp", layer.mlp),
                 (f"layers.{i}.output", layer)]
    mods.append(("ln_f", model.model.norm))
    handles = [m.register_forward_hook(hook(name)) for name, m in mods]
    try:
        device = next(model.parameters()).device
        out["logits"] = model(torch.tensor([list(token_ids)], device=device), use_cache=False).logits[0]
    finally:
        for h in handles:
            h.remove()
    return out


def diff(name: str, test: Tensor, ref: Tensor, tol: float) -> LayerDiff:
    """Statistics of test - ref, computed in float64."""
    if test.shape != ref.shape:
        raise QWenError(f"{name}: engine shape {tuple(test.shape)} != reference shape {tuple(ref.shape)}")
    t, r = test.double().cpu(), ref.double().cpu()
    d = t - r
    ref_norm = r.norm().item()
    rel = d.norm().item() / ref_norm if ref_norm else (0.0 if d.norm().item() == 0 else float("inf"))
    cos = torch.nn.functional.cosine_similarity(t.flatten(), r.flatten(), dim=0, eps=1e-30).item()
    return LayerDiff(name, tuple(ref.shape), d.abs().max().item(), d.abs().mean().item(), rel, cos, tol)


def compare_layers(engine, reference_model, token_ids: Sequence[int], tol: float | None = None) -> list[LayerDiff]:
    """Every captured tensor of the engine against the reference, in network order."""
    if not token_ids:
        raise QWenError("give at least one input token")
    cfg = engine.config
    if max(token_ids) >= cfg.vocab_size or min(token_ids) < 0:
        raise QWenError(f"token ids must lie in [0, {cfg.vocab_size}); is the tokenizer the engine's?")
    if len(token_ids) > cfg.seq_length:
        raise QWenError(f"{len(token_ids)} tokens exceed the trained context seq_length {cfg.seq_length}: beyond it "
                        "Qwen applies dynamic NTK and logn scaling, which the Qwen2 reference lacks")
    tol = engine_tolerance(engine) if tol is None else tol
    got, want = engine_intermediates(engine, token_ids), reference_intermediates(reference_model, token_ids)
    return [diff(n, got[n], want[n], tol) for n in tensor_names(cfg.num_hidden_layers)]


def first_flagged(diffs: Sequence[LayerDiff]) -> LayerDiff | None:
    """The earliest tensor over tolerance in network order: where the discrepancy starts."""
    return next((d for d in diffs if d.flagged), None)


def format_table(diffs: Sequence[LayerDiff]) -> str:
    rows = [f"{'tensor':<22} {'shape':<16} {'max |d|':>10} {'mean |d|':>10} {'rel err':>10} {'cosine':>12}  flag"]
    for d in diffs:
        rows.append(f"{d.name:<22} {'x'.join(map(str, d.shape)):<16} {d.max_abs:>10.3e} {d.mean_abs:>10.3e} "
                    f"{d.rel_err:>10.3e} {d.cosine:>12.9f}  {'OVER' if d.flagged else ''}")
    return "\n".join(rows)
