"""hf_qwen_convert.py and build.py: FT round trips, per-rank layout, config.ini, CLI errors, output rules."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_trtllm import QWenError
from qwen_trtllm.checkpoint import ft_format
from qwen_trtllm.checkpoint.ft_format import convert_checkpoint, merge_ft_ranks, read_ft_config, read_ft_rank
from qwen_trtllm.checkpoint.hf_checkpoint import HFCheckpoint
from qwen_trtllm.checkpoint.random_checkpoint import write_random_checkpoint
from qwen_trtllm.config import QWenConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "qwen" / "hf_qwen_convert.py"
LAYOUTS = ("safetensors-sharded", "safetensors", "bin-sharded")
SHARD = 1 << 17  # the tiny model is ~1.3 MB in float32: several shards


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# --- round trips ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("generation", ["v1.1", "v1.0"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip(make_checkpoint, tmp_path, generation, layout):
    ckpt_dir = make_checkpoint(generation=generation, layout=layout, shard_bytes=SHARD)
    ckpt = HFCheckpoint(ckpt_dir)
    assert ckpt.format == ("bin" if layout == "bin-sharded" else "safetensors")
    if layout != "safetensors":
        assert len(set(map(ckpt.file_of, ckpt.names()))) > 2
    hf = {n: ckpt.get(n).clone() for n in ckpt.expected_shapes()}
    for tp in (1, 2, 4):
        for storage in ("float32", "float16", "bfloat16"):
            ft = convert_checkpoint(ckpt_dir, tmp_path / storage, tp=tp, storage_type=storage)
            assert ft == tmp_path / storage / f"{tp}-gpu"
            merged = merge_ft_ranks(ft)
            assert merged.keys() == hf.keys()
            dtype = getattr(torch, storage)
            for name, want in hf.items():
                got = merged[name]
                assert got.dtype == dtype and torch.equal(got, want.to(dtype)), (name, tp, storage)


def test_single_pytorch_model_bin(make_checkpoint, tmp_path):
    src = HFCheckpoint(make_checkpoint(shard_bytes=SHARD))
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copyfile(src.path / "config.json", d / "config.json")
    state = {n: src.get(n).clone() for n in src.expected_shapes()}
    torch.save({**state, "transformer.h.0.attn.rotary_emb.inv_freq": torch.ones(8)}, d / "pytorch_model.bin")
    ckpt = HFCheckpoint(d)
    ckpt.validate()  # the inv_freq buffer is tolerated and not converted
    merged = merge_ft_ranks(convert_checkpoint(d, tmp_path / "out", tp=2, storage_type="float32"))
    assert merged.keys() == state.keys() and all(torch.equal(merged[n], state[n]) for n in state)


def test_lookup_order_prefers_safetensors(make_checkpoint, tmp_path):
    d = shutil.copytree(make_checkpoint(layout="safetensors"), tmp_path / "c")
    (d / "pytorch_model.bin").write_bytes(b"not read")
    assert HFCheckpoint(d).format == "safetensors"


def test_bin_never_unpickles_code(make_checkpoint, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    shutil.copyfile(make_checkpoint(shard_bytes=SHARD) / "config.json", d / "config.json")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": Evil()}, f, protocol=2)
    with pytest.raises(QWenError, match="cannot read weight file"):
        HFCheckpoint(d)
    assert not marker.exists()


# --- per-rank layout ----------------------------------------------------------------------------------------
def test_rank_contents_tp2(make_checkpoint, tmp_path):
    ckpt_dir = make_checkpoint(shard_bytes=SHARD)
    ckpt = HFCheckpoint(ckpt_dir)
    c = ckpt.config
    H, nh, D, F = c.hidden_size, c.num_attention_heads, c.kv_channels, c.ffn_hidden_size
    ft = convert_checkpoint(ckpt_dir, tmp_path, tp=2, storage_type="float32")
    p = "transformer.h.1."
    qkv, bias = ckpt.get(p + "attn.c_attn.weight"), ckpt.get(p + "attn.c_attn.bias")
    for r in range(2):
        rank = read_ft_rank(ft, r)
        heads = range(r * nh // 2, (r + 1) * nh // 2)
        rows = [j * H + h * D + d for j in range(3) for h in heads for d in range(D)]  # Q_r | K_r | V_r
        got = rank["model.layers.1.attention.qkv.weight"]
        assert got.shape == (H, 3 * H // 2)
        assert torch.equal(got, qkv[rows].t())
        assert torch.equal(rank["model.layers.1.attention.qkv.bias"], bias[rows])
        cols = [h * D + d for h in heads for d in range(D)]
        on_disk = np.fromfile(ft / f"model.layers.1.attention.qkv.weight.{r}.bin", dtype="<f4").reshape(H, 3, H // 2)
        assert torch.equal(torch.from_numpy(on_disk)[:, 1], qkv[H:2 * H][cols].t())  # [H, 3, H/tp]: K_r in the middle
        dense = ckpt.get(p + "attn.c_proj.weight")
        assert torch.equal(rank["model.layers.1.attention.dense.weight"], dense[:, cols].t())
        ff = slice(r * F // 2, (r + 1) * F // 2)
        assert torch.equal(rank["model.layers.1.mlp.w1.weight"], ckpt.get(p + "mlp.w1.weight")[ff].t())
        assert torch.equal(rank["model.layers.1.mlp.w2.weight"], ckpt.get(p + "mlp.w2.weight")[ff].t())
        assert torch.equal(rank["model.layers.1.mlp.c_proj.weight"], ckpt.get(p + "mlp.c_proj.weight")[:, ff].t())
        assert torch.equal(rank["vocab_embedding.weight"], ckpt.get("transformer.wte.weight"))
        assert torch.equal(rank["lm_head.weight"], ckpt.get("lm_head.weight"))
        assert torch.equal(rank["model.layers.1.ln_2.weight"], ckpt.get(p + "ln_2.weight"))
    names = {f.name for f in ft.iterdir()}
    assert {"vocab_embedding.weight.bin", "model.layers.0.ln_1.weight.bin", "model.layers.0.mlp.w1.weight.1.bin",
            "model.layers.1.attention.qkv.bias.0.bin", "config.ini"} <= names
    assert not any(".ln_1.weight.0." in n for n in names)


@pytest.mark.parametrize("generation", ["v1.1", "v1.0"])
def test_config_ini_round_trip(make_checkpoint, tmp_path, generation):
    ckpt_dir = make_checkpoint(generation=generation, shard_bytes=SHARD)
    ft = convert_checkpoint(ckpt_dir, tmp_path, tp=2, storage_type="bf16")
    config, info = read_ft_config(ft)
    assert config == QWenConfig.from_hf_dir(ckpt_dir)
    assert info == {"model_dir": str(ckpt_dir), "storage_dtype": "bfloat16", "tensor_parallelism": 2}
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert (ft / name).read_bytes() == (ckpt_dir / name).read_bytes()


def test_tokenizer_file_copied(make_checkpoint, tiktoken_file, tmp_path):
    ft = convert_checkpoint(make_checkpoint(tokenizer_file=tiktoken_file), tmp_path, storage_type="float32")
    assert (ft / "qwen.tiktoken").read_bytes() == Path(tiktoken_file).read_bytes()


def test_reader_errors(tiny_checkpoint, tmp_path):
    ft = convert_checkpoint(tiny_checkpoint, tmp_path, tp=2, storage_type="float16")
    f = ft / "model.layers.1.mlp.c_proj.weight.1.bin"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(QWenError, match=r"c_proj\.weight\.1\.bin has .* bytes.*hf_qwen_convert"):
        read_ft_rank(ft, 1)
    read_ft_rank(ft, 0)
    f.unlink()
    with pytest.raises(QWenError, match=r"c_proj\.weight\.1\.bin is missing"):
        read_ft_rank(ft, 1)
    with pytest.raises(QWenError, match="rank 2 out of range"):
        read_ft_rank(ft, 2)
    ini = ft / "config.ini"
    ini.write_text(ini.read_text() + "mystery_knob = 1\n")
    with pytest.raises(QWenError, match="unknown keys.*mystery_knob"):
        read_ft_config(ft)
    with pytest.raises(QWenError, match="run hf_qwen_convert.py"):
        read_ft_config(tmp_path / "nowhere")


# --- atomicity, parallelism, chunking ---------------------------------------------------------------------
def test_failure_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    calls = []

    def failing(view, path, storage_type):
        calls.append(path)
        if len(calls) > 5:
            raise OSError(28, "No space left on device")
        return path.write_bytes(b"x")

    monkeypatch.setattr(ft_format, "write_raw", failing)
    out = tmp_path / "a" / "b"
    with pytest.raises(QWenError, match="No space left"):
        convert_checkpoint(tiny_checkpoint, out)
    assert not (tmp_path / "a").exists()


def test_processes_and_chunking_do_not_change_bytes(tiny_checkpoint, tmp_path, monkeypatch):
    one = files_of(convert_checkpoint(tiny_checkpoint, tmp_path / "p1", tp=2, storage_type="bfloat16"))
    two = files_of(convert_checkpoint(tiny_checkpoint, tmp_path / "p2", tp=2, storage_type="bfloat16", processes=2))
    assert one == two
    monkeypatch.setattr(ft_format, "CHUNK_BYTES", 3000)  # many slabs per tensor, ragged transpose tiles
    monkeypatch.setattr(ft_format, "TILE", 3)
    assert files_of(convert_checkpoint(tiny_checkpoint, tmp_path / "c", tp=2, storage_type="bfloat16")) == one


# --- the CLI ---------------------------------------------------------------------------------------------
def cli(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def rewrite_shard(ckpt: Path, name: str, new: torch.Tensor | None) -> None:
    """Replace (or, with new=None, drop) one tensor inside its safetensors shard; the index is left as is."""
    shard = ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(str(shard))
    if new is None:
        del tensors[name]
    else:
        tensors[name] = new
    save_file(tensors, str(shard), metadata={"format": "pt"})


BAD_CASES = {  # case -> (expected stderr fragment)
    "missing_dir": "does not exist",
    "missing_tensor": "transformer.h.1.mlp.w1.weight",
    "misshapen_tensor": "transformer.h.0.attn.c_proj.weight has shape [64, 60], expected [64, 64]",
    "unknown_config_key": "unknown config keys in config.json: mystery_knob",
    "tp3": "tensor parallelism 3 must divide",
    "output_exists": "exists; pass --force to overwrite",
}


@pytest.fixture(scope="module")
def cli_runs(make_checkpoint, tmp_path_factory):
    """Every bad-input case run concurrently through the CLI: case -> (returncode, stderr, output dir)."""
    good = make_checkpoint(shard_bytes=SHARD)
    work = tmp_path_factory.mktemp("cli")
    copies = {}
    for case in ("missing_tensor", "misshapen_tensor", "unknown_config_key"):
        copies[case] = shutil.copytree(good, work / f"in_{case}")
    rewrite_shard(copies["missing_tensor"], "transformer.h.1.mlp.w1.weight", None)
    rewrite_shard(copies["misshapen_tensor"], "transformer.h.0.attn.c_proj.weight", torch.zeros(64, 60))
    cfg = json.loads((good / "config.json").read_text())
    (copies["unknown_config_key"] / "config.json").write_text(json.dumps({**cfg, "mystery_knob": 1}))
    exists = work / "out_output_exists"
    convert_checkpoint(good, exists, storage_type="float32")
    inputs = {**copies, "missing_dir": work / "no_such_checkpoint", "tp3": good, "output_exists": good}
    procs = {}
    for case in BAD_CASES:
        out = exists if case == "output_exists" else work / f"out_{case}"
        tp = "3" if case == "tp3" else "1"
        procs[case] = (cli("-i", inputs[case], "-o", out, "--tensor-parallelism", tp, "--storage-type", "float16"),
                       out)
    return {case: (p.wait(), p.communicate()[1], out) for case, (p, out) in procs.items()}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_cli_bad_input(cli_runs, case):
    rc, stderr, out = cli_runs[case]
    assert rc == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and BAD_CASES[case] in lines[0], stderr
    if case == "output_exists":  # untouched
        assert read_ft_config(out / "1-gpu")[1]["storage_dtype"] == "float32"
    else:
        assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_cli_success_and_force(make_checkpoint, tmp_path):
    ckpt_dir = make_checkpoint(shard_bytes=SHARD)
    out = tmp_path / "c-model" / "Qwen"
    p = cli("-i", ckpt_dir, "-o", out, "--tensor-parallelism", "2", "--storage-type", "fp16", "-p", "1")
    stdout, stderr = p.communicate()
    assert p.returncode == 0, stderr
    assert "2-gpu" in stdout
    assert read_ft_config(out / "2-gpu")[1]["storage_dtype"] == "float16"
    p = cli("-i", ckpt_dir, "-o", out, "-tp", "2", "-t", "bfloat16", "--force")
    assert p.wait() == 0, p.communicate()[1]
    merged = merge_ft_ranks(out / "2-gpu")
    ckpt = HFCheckpoint(ckpt_dir)
    assert all(torch.equal(merged[n], ckpt.get(n).to(torch.bfloat16)) for n in ckpt.expected_shapes())
    assert sorted(p.name for p in out.iterdir()) == ["2-gpu"]


# --- build.py: the same output rule, non-finite weights, file modes, the tokenizer ------------------------------
def tiny_build(ckpt: Path, out: Path, **kw) -> Path:
    from qwen_trtllm.builder.build import build_engine

    kw = {"dtype": "float32", "max_batch_size": 1, "max_input_len": 16, "max_output_len": 4, **kw}
    return build_engine(out, **({"hf_dir": ckpt} if "ft_dir" not in kw else {}), **kw)


def test_build_replaces_an_engine_only_with_force(tiny_checkpoint, tmp_path, run_script):
    from qwen_trtllm.runtime.engine import read_engine_config

    out = tiny_build(tiny_checkpoint, tmp_path / "engine", dtype="bf16")  # aliases reach the library too
    assert read_engine_config(out)[1].dtype == "bfloat16"
    with pytest.raises(QWenError, match="already holds an engine: pass --force"):
        tiny_build(tiny_checkpoint, out, max_batch_size=3)
    assert read_engine_config(out)[1].max_batch_size == 1
    code, stdout, err = run_script("build.py", "--hf_model_dir", tiny_checkpoint, "--output_dir", out, "--dtype",
                                   "fp32", "--max_batch_size", 3, "--force", "--max_input_len", 16)
    assert code == 0, err
    assert read_engine_config(out)[1].max_batch_size == 3 and read_engine_config(out)[1].dtype == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]  # no temporary or old copy left
    assert "Total time of building all engines: 00:00:0" in err  # TensorRT-LLM's line, timestamped log format
    assert re.search(r"^\[\d\d/\d\d/\d{4}-\d\d:\d\d:\d\d\] \[QWen\] \[I\] ", err, re.M), err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for force in (False, True):  # never replaced, whatever the flag
        with pytest.raises(QWenError, match="non-empty directory that is not an engine"):
            tiny_build(tiny_checkpoint, other, force=force)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(QWenError, match="is the checkpoint being built"):
        tiny_build(tiny_checkpoint, tiny_checkpoint, force=True)


def test_convert_never_replaces_what_is_not_an_ft_directory(tiny_checkpoint, tmp_path):
    (tmp_path / "1-gpu").mkdir()
    (tmp_path / "1-gpu" / "notes.txt").write_text("mine")
    with pytest.raises(QWenError, match="is not an FT directory"):
        convert_checkpoint(tiny_checkpoint, tmp_path, force=True)
    assert (tmp_path / "1-gpu" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("mask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_outputs_get_the_umask_modes(tiny_checkpoint, tmp_path, mask, dir_mode, file_mode):
    import os
    import stat

    import numpy as np

    from qwen_trtllm.runtime.runner import write_outputs

    old = os.umask(mask)
    try:
        engine = tiny_build(tiny_checkpoint, tmp_path / "engine")
        ft = convert_checkpoint(tiny_checkpoint, tmp_path / "c-model", storage_type="float32")
        write_outputs([[1, 2]], np.array([[5, 1, 2]]), str(tmp_path / "o.csv"), str(tmp_path / "o.npy"))
        ckpt = write_random_checkpoint(tmp_path / "ckpt", shard_bytes=SHARD)
    finally:
        os.umask(old)
    for d in (engine, ft, ckpt):
        assert stat.S_IMODE(d.stat().st_mode) == dir_mode, d
        files = [f for f in d.iterdir()]
        assert files and all(stat.S_IMODE(f.stat().st_mode) == file_mode for f in files), d
    for name in ("o.csv", "o.npy"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == file_mode, name


def test_non_finite_weights_are_refused_at_build(make_checkpoint, tmp_path):
    good = make_checkpoint(shard_bytes=SHARD)
    nan = shutil.copytree(good, tmp_path / "nan")
    w = HFCheckpoint(good).get("transformer.h.1.mlp.w1.weight").clone()
    w[3, 5] = float("nan")
    rewrite_shard(nan, "transformer.h.1.mlp.w1.weight", w)
    with pytest.raises(QWenError, match=r"^tensor transformer\.h\.1\.mlp\.w1\.weight of .* holds NaN or Inf"):
        tiny_build(nan, tmp_path / "e1")
    ft = convert_checkpoint(good, tmp_path / "ft", storage_type="float32")  # the FT path: +Inf in one file
    f = ft / "model.layers.0.attention.dense.weight.0.bin"
    data = np.fromfile(f, dtype="<f4")
    data[7] = np.inf
    data.tofile(f)
    with pytest.raises(QWenError, match=r"^tensor model\.layers\.0\.attention\.dense\.weight of .* holds NaN or Inf"):
        tiny_build(None, tmp_path / "e2", ft_dir=ft)
    big = shutil.copytree(good, tmp_path / "big")  # finite, but beyond float16's range
    w = HFCheckpoint(good).get("transformer.h.0.attn.c_proj.weight").clone()
    w[0, 0] = 1e6
    rewrite_shard(big, "transformer.h.0.attn.c_proj.weight", w)
    with pytest.raises(QWenError, match=r"attn\.dense\.weight is NaN or Inf in the engine's float16.*--dtype bfloat16"):
        tiny_build(big, tmp_path / "e3", dtype="float16")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".e", "e"))]  # nothing half-written
    tiny_build(big, tmp_path / "e4", dtype="bfloat16")


def test_build_tokenizer_dir(make_checkpoint, tiktoken_file, tmp_path, run_script):
    ckpt = make_checkpoint(vocab_size=151936, seq_length=64, shard_bytes=1 << 22)  # Qwen's vocabulary, no tokenizer
    code, _, err = run_script("build.py", "--hf_model_dir", ckpt, "--dtype", "float32", "--max_input_len", 16,
                              "--max_output_len", 4, "--output_dir", tmp_path / "bare")
    assert code == 0, err
    warning = [line for line in err.splitlines() if "[W]" in line]
    assert len(warning) == 1 and "has no qwen.tiktoken" in warning[0] and "--tokenizer_dir" in warning[0], err
    assert not (tmp_path / "bare" / "qwen.tiktoken").exists()
    code, _, err = run_script("build.py", "--hf_model_dir", ckpt, "--dtype", "float32", "--max_input_len", 16,
                              "--max_output_len", 4, "--output_dir", tmp_path / "tok", "--tokenizer_dir",
                              tiktoken_file.parent)
    assert code == 0 and "[W]" not in err, err
    assert (tmp_path / "tok" / "qwen.tiktoken").read_bytes() == tiktoken_file.read_bytes()
    assert (tmp_path / "tok" / "generation_config.json").read_bytes() == (ckpt / "generation_config.json").read_bytes()
    code, _, err = run_script("build.py", "--hf_model_dir", make_checkpoint(shard_bytes=SHARD), "--dtype", "float32",
                              "--output_dir", tmp_path / "small", "--tokenizer_dir", tiktoken_file.parent)
    assert code == 2 and "it is not this model's tokenizer" in err and not (tmp_path / "small").exists(), err
    code, _, err = run_script("build.py", "--hf_model_dir", ckpt, "--output_dir", tmp_path / "x", "--tokenizer_dir",
                              tmp_path)
    assert code == 2 and f"--tokenizer_dir {tmp_path} has no qwen.tiktoken" in err, err


def test_convert_warns_about_a_missing_tokenizer(tiny_checkpoint, tmp_path, run_script):
    code, _, err = run_script("hf_qwen_convert.py", "-i", tiny_checkpoint, "-o", tmp_path, "-t", "fp32")
    assert code == 0, err
    warning = [line for line in err.splitlines() if "[W]" in line]
    assert len(warning) == 1 and "has no qwen.tiktoken" in warning[0] and "--tokenizer_dir" in warning[0], err
    assert read_ft_config(tmp_path / "1-gpu")[1]["storage_dtype"] == "float32"
