"""The torch-free merge kernel: every action and dtype against torch, in the worker process and in-process, with
OpenCV and with the numpy fallback, with and without O_DIRECT; interrupt, bad input, the output hash."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from studio.errors import StudioError
from studio.merge import kernel, kernel_io, runner


def _tensors(seed: int, in_ch: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "big.f16": r(6 << 20).half(),              # 12 MB: spans several kernel blocks
        "w.f16": r(64, 33).half(), "w.bf16": r(64, 33).bfloat16(), "w.f32": r(1000), "w.f64": r(77).double(),
        "tiny.f16": r(3).half(), "tiny.f32": r(1),  # OpenCV would read these as scalars
        "conv.in": r(8, in_ch, 3, 3),
        "ids.i64": torch.arange(10) + seed, "flag.bool": torch.tensor([True, False, bool(seed % 2)]),
        "vec.f32": r(515),
    }


@pytest.fixture()
def files(tmp_path):
    paths = []
    for name, seed, ch in (("a", 1, 9), ("b", 2, 4), ("c", 3, 4)):
        p = tmp_path / f"{name}.safetensors"
        save_file(_tensors(seed, ch), str(p))
        paths.append(p)
    return paths


def _ops() -> list:
    ab, abc = lambda k: [[0, k], [1, k]], lambda k: [[0, k], [1, k], [2, k]]  # noqa: E731
    return [
        ["big.f16", "F16", [6 << 20], "weighted_sum", 0.3, ab("big.f16")],
        ["w.f16", "F16", [64, 33], "weighted_sum", 0.7, ab("w.f16")],
        ["w.bf16", "BF16", [64, 33], "weighted_sum", 0.25, ab("w.bf16")],
        ["w.f32", "F32", [1000], "add_difference", 0.6, abc("w.f32")],
        ["w.f64", "F64", [77], "weighted_sum", 0.5, ab("w.f64")],
        ["add.f16", "F16", [64, 33], "add_difference", 0.4, [[0, "w.f16"], [1, "w.f16"], [2, "w.f16"]]],
        ["add.bf16", "BF16", [64, 33], "add_difference", 0.4, [[0, "w.bf16"], [1, "w.bf16"], [2, "w.bf16"]]],
        ["tiny.f16", "F16", [3], "weighted_sum", 0.5, ab("tiny.f16")],
        ["tiny.f32", "F32", [1], "weighted_sum", 1.0, ab("tiny.f32")],
        ["mixed.f32", "F32", [64, 33], "weighted_sum", 0.3, [[0, "w.f16"], [1, "w.bf16"]]],
        ["mixed.f16", "F16", [1000], "weighted_sum", 0.3, [[0, "w.f32"], [1, "w.f32"]]],
        ["half.f16", "F16", [515], "copy", 0, [[0, "vec.f32"]]],
        ["half.bf16", "BF16", [515], "copy", 0, [[0, "vec.f32"]]],
        ["wide.f32", "F32", [64, 33], "copy", 0, [[0, "w.bf16"]]],
        ["reshaped.f32", "F32", [5, 103], "copy", 0, [[1, "vec.f32"]]],
        ["conv.in", "F32", [8, 9, 3, 3], "weighted_sum_in4", 0.25, ab("conv.in")],
        ["conv.diff", "F16", [8, 9, 3, 3], "add_difference_in4", 0.5, abc("conv.in")],
        ["ids.i64", "I64", [10], "copy", 0, [[1, "ids.i64"]]],
        ["flag.bool", "BOOL", [3], "copy", 0, [[0, "flag.bool"]]],
    ]


def _expected(a, b, c) -> dict[str, torch.Tensor]:
    f = lambda t: t.double()  # noqa: E731
    ws = lambda x, y, m: f(x) * (1 - m) + f(y) * m  # noqa: E731
    ad = lambda x, y, z, m: f(x) + (f(y) - f(z)) * m  # noqa: E731
    conv = f(a["conv.in"]).clone()
    conv[:, :4] = ws(a["conv.in"][:, :4], b["conv.in"], 0.25)
    diff = f(a["conv.in"]).clone()
    diff[:, :4] = ad(a["conv.in"][:, :4], b["conv.in"], c["conv.in"], 0.5)
    return {
        "big.f16": ws(a["big.f16"], b["big.f16"], 0.3), "w.f16": ws(a["w.f16"], b["w.f16"], 0.7),
        "w.bf16": ws(a["w.bf16"], b["w.bf16"], 0.25), "w.f32": ad(a["w.f32"], b["w.f32"], c["w.f32"], 0.6),
        "w.f64": ws(a["w.f64"], b["w.f64"], 0.5), "add.f16": ad(a["w.f16"], b["w.f16"], c["w.f16"], 0.4),
        "add.bf16": ad(a["w.bf16"], b["w.bf16"], c["w.bf16"], 0.4), "tiny.f16": ws(a["tiny.f16"], b["tiny.f16"], 0.5),
        "tiny.f32": f(b["tiny.f32"]), "mixed.f32": ws(a["w.f16"], b["w.bf16"], 0.3),
        "mixed.f16": ws(a["w.f32"], b["w.f32"], 0.3), "half.f16": f(a["vec.f32"]), "half.bf16": f(a["vec.f32"]),
        "wide.f32": f(a["w.bf16"]), "reshaped.f32": f(b["vec.f32"]).reshape(5, 103), "conv.in": conv,
        "conv.diff": diff, "ids.i64": b["ids.i64"], "flag.bool": a["flag.bool"],
    }


# one rounding into the output dtype; add difference's B − C is rounded once more for fp16 / fp32 in OpenCV
TOL = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
       torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _check(out_path, files):
    a, b, c = (load_file(str(p)) for p in files)
    out, want = load_file(str(out_path)), _expected(a, b, c)
    assert set(out) == set(want)
    for k, v in want.items():
        got = out[k]
        if v.dtype in (torch.int64, torch.bool):
            assert torch.equal(got, v), k
            continue
        assert tuple(got.shape) == tuple(v.shape), k
        torch.testing.assert_close(got.double(), v, **TOL[got.dtype], msg=k)
    # conversions are exact roundings, bit for bit what torch does
    assert torch.equal(out["half.f16"], a["vec.f32"].half())
    assert torch.equal(out["half.bf16"], a["vec.f32"].bfloat16())
    assert torch.equal(out["wide.f32"], a["w.bf16"].float())
    assert torch.equal(out["tiny.f32"], b["tiny.f32"])  # M = 1 gives B exactly
    assert torch.equal(out["conv.in"][:, 4:], a["conv.in"][:, 4:])
    return out


def _drop_cache(paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.mark.parametrize("mode", ["worker", "in-process", "numpy", "buffered-io"])
def test_every_action_and_dtype(files, tmp_path, monkeypatch, mode):
    out = tmp_path / "out.safetensors"
    meta = {"format": "pt", "note": "kernel"}
    if hasattr(os, "posix_fadvise"):
        _drop_cache(files)  # the first reads then go around the page cache (O_DIRECT)
    if mode == "worker":
        stats = runner.run(_ops(), files, out, meta, sha256=True)
        assert stats["in_process"] is False and stats["torch_loaded"] is False
    else:
        if mode == "numpy":
            monkeypatch.setattr(kernel, "cv2", None)
        if mode == "buffered-io":
            monkeypatch.delattr(os, "O_DIRECT", raising=False)
        inputs = [kernel_io.FileInput(str(p)) for p in files]
        try:
            stats = kernel.run(_ops(), inputs, str(out), meta, workers=3, sha256=True)
        finally:
            for i in inputs:
                i.close()
        assert stats["direct_io"] is (mode != "buffered-io" and hasattr(os, "O_DIRECT"))
    _check(out, files)
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == meta
    assert stats["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert stats["blocks"] >= 3


def test_in_memory_inputs_match_files(files, tmp_path):
    from studio.merge.stio import DictSource
    arrays = [kernel_io.ArrayInput(DictSource(load_file(str(p))).arrays()) for p in files]
    kernel.run(_ops(), arrays, str(tmp_path / "mem.safetensors"))
    runner.run(_ops(), files, tmp_path / "file.safetensors", None)
    mem, disk = load_file(str(tmp_path / "mem.safetensors")), load_file(str(tmp_path / "file.safetensors"))
    assert all(torch.equal(mem[k], disk[k]) for k in disk)


def test_interrupt_kills_the_worker_and_removes_the_output(files, tmp_path):
    out = tmp_path / "out.safetensors"
    seen = []

    class Stop(Exception):
        pass

    def progress(done, total, key):
        seen.append(done)
        raise Stop()

    with pytest.raises(Stop):
        runner.run(_ops(), files, out, None, progress)
    assert seen == [1] and not out.exists()


def test_bad_inputs_are_named(files, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(files[0].read_bytes()[:-100])
    with pytest.raises(StudioError, match="truncated"):
        runner.run(_ops(), [cut, files[1], files[2]], tmp_path / "x.safetensors", None)
    bad = _ops()
    bad[0][5][1][1] = "missing.key"
    with pytest.raises(StudioError, match="missing.key"):
        runner.run(bad, files, tmp_path / "x.safetensors", None)
    with pytest.raises(StudioError, match="I64 tensors cannot be merged"):
        runner.run([["x", "F32", [10], "weighted_sum", 0.5, [[0, "ids.i64"], [1, "ids.i64"]]]], files,
                   tmp_path / "x.safetensors", None)
    with pytest.raises(StudioError, match="cannot produce I64"):
        runner.run([["x", "I64", [10], "weighted_sum", 0.5, [[0, "ids.i64"], [1, "ids.i64"]]]], files,
                   tmp_path / "x.safetensors", None)
    with pytest.raises(StudioError, match="could not be read"):
        runner.run(_ops(), [tmp_path, files[1], files[2]], tmp_path / "x.safetensors", None)
    assert not (tmp_path / "x.safetensors").exists()


def test_worker_stops_when_the_studio_goes_away(files, tmp_path):
    """End of stdin (the studio closed or died) stops the worker and removes its partial output."""
    import json
    import subprocess
    import sys
    out = tmp_path / "orphan.safetensors"
    job = {"ops": _ops(), "inputs": [str(p) for p in files], "output": str(out)}
    proc = subprocess.Popen([sys.executable, "-m", "studio.merge.kernel"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=runner.ROOT)
    proc.stdin.write(json.dumps(job) + "\n")
    proc.stdin.close()  # as if the studio died at once
    code = proc.wait(timeout=60)
    lines = proc.stdout.read()
    assert code in (0, 3)  # 3: stopped; 0: this tiny job may finish before the stop is seen
    assert out.exists() == (code == 0) and ("OK" in lines) == (code == 0)
