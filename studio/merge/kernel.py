"""Torch-free merge kernel: writes a .safetensors file in which every tensor is a copy, a dtype conversion or an
elementwise merge of input tensors.

It runs in a worker process of its own (``python -m studio.merge.kernel``, the job as JSON on stdin) and
imports only the standard library and numpy. Importing torch costs ~0.5 GB of resident memory before a single
tensor is read (CUDA builds map cuBLAS and friends), which is more than a streamed merge of two SD1 checkpoints
needs in all; numpy costs ~25 MB. Inputs that live in memory (pickled .ckpt files, diffusers folders) run the
same code in the calling process instead (:func:`run` with :class:`ArrayInput`).

How it works: the output file, header included, is cut into fixed blocks of BLOCK bytes. Each block is an
independent task: a worker thread reads the input ranges it needs, merges them, and writes the block at its own
offset. Blocks finish
out of order, so the reads, numpy loops and writes of different blocks overlap on every core without a staged
pipeline (each of those releases the GIL). Memory is a few blocks per worker, whatever the size of the inputs.

Reading and writing (direct I/O around the page cache where it helps) are in kernel_io.py.

Numbers: float16 and float32 go through OpenCV (a dependency already, via controlnet-aux), whose SIMD loops
work on float16 directly: it computes in float32 and rounds once to nearest-even, ~0.1 ns per element, where
numpy's own float16 casts cost ~3 ns per element of a weighted sum. bfloat16 (numpy has no such type: its bits
are shifted in and out of float32) and float64 go through numpy, with ``torch.lerp``'s formulas. Weighted sum is
A·(1−M) + B·M, add difference A + (B − C)·M with B − C taken in float32. Tensors of any other dtype can only be
copied unchanged.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import mmap
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np

from .kernel_io import ITEMSIZE, FileInput, MergeError, Output


def _opencv():
    """OpenCV if it does float16 arithmetic (older builds do not); else None: everything takes the numpy path."""
    try:
        import cv2
        probe = np.ones(32, np.float16)
        return cv2 if cv2.addWeighted(probe, 0.5, probe, 0.5, 0.0).dtype == np.float16 else None
    except Exception:  # ImportError, or cv2.error from an OpenCV without float16 support
        return None


cv2 = _opencv()

BLOCK = 4 << 20          # bytes of output per task (and about what each input is read in per request)
SUB = 1 << 18            # elements per numpy sub-chunk: 1 MB of float32, stays in L2
FLOAT = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # bf16 held as raw bits
ACTIONS = ("copy", "weighted_sum", "add_difference", "weighted_sum_in4", "add_difference_in4")


class Stopped(Exception):
    """The caller asked the merge to stop."""


class _Op:
    __slots__ = ("key", "dtype", "shape", "action", "m", "srcs", "start", "end", "isz")

    def __init__(self, key, dtype, shape, action, m, srcs):
        self.key, self.dtype, self.shape, self.action, self.m = key, dtype, tuple(shape), action, float(m)
        self.srcs = [(int(i), k) for i, k in srcs]
        self.isz = ITEMSIZE[dtype]


class _Scratch:
    """One worker thread's reusable buffers (allocated once, so nothing is page-faulted per block)."""

    def __init__(self):
        self.block = mmap.mmap(-1, BLOCK)           # page-aligned, as O_DIRECT wants
        self.view = memoryview(self.block)
        self._arrays: dict = {}

    def array(self, role: str, dtype, n: int) -> np.ndarray:
        a = self._arrays.get((role, dtype))
        if a is None or a.size < n:
            a = self._arrays[(role, dtype)] = np.empty(max(n, SUB), dtype)
        return a[:n]


def _cv_type(code: str) -> int:
    return cv2.CV_16F if code == "F16" else cv2.CV_32F


def _fast(action: str, m: float, raws: list[np.ndarray], out: np.ndarray, code: str) -> None:
    """float16 / float32 in and out, through OpenCV (results written into ``out``)."""
    t = _cv_type(code)
    if action == "copy":
        cv2.multiply(raws[0], 1.0, dst=out, dtype=t)   # x·1 keeps the sign of −0, unlike x + 0
        return
    if len({r.dtype for r in raws}) > 1:               # mixed fp16 / fp32 inputs: widen them all
        raws = [r if r.dtype == np.float32 else cv2.multiply(r, 1.0, dtype=cv2.CV_32F) for r in raws]
    if action == "weighted_sum":
        cv2.addWeighted(raws[0], 1.0 - m, raws[1], m, 0.0, dst=out, dtype=t)
    else:
        diff = cv2.subtract(raws[1], raws[2], dtype=cv2.CV_32F)
        cv2.addWeighted(raws[0], 1.0, diff, m, 0.0, dst=out, dtype=t)


def _work_dtype(codes) -> type:
    return np.float64 if "F64" in codes else np.float32


def _widen(raw: np.ndarray, code: str, out: np.ndarray, scratch: _Scratch) -> np.ndarray:
    if code == "BF16":  # bfloat16 is the top half of a float32
        f32 = out if out.dtype == np.float32 else scratch.array("bf", np.float32, raw.size)
        np.left_shift(raw, 16, out=f32.view(np.uint32), dtype=np.uint32)
        if f32 is not out:
            np.copyto(out, f32)
        return out
    np.copyto(out, raw, casting="unsafe")
    return out


def _narrow(work: np.ndarray, code: str, out: np.ndarray, scratch: _Scratch) -> None:
    if code != "BF16":
        np.copyto(out, work, casting="unsafe")  # numpy rounds to nearest-even, like torch
        return
    f32 = work if work.dtype == np.float32 else work.astype(np.float32)
    u = f32.view(np.uint32)
    t = scratch.array("u32", np.uint32, u.size)
    np.right_shift(u, 16, out=t)                # round to nearest-even on the dropped 16 bits
    np.bitwise_and(t, 1, out=t)
    t += 0x7FFF
    t += u
    t >>= 16
    np.copyto(out, t, casting="unsafe")
    nan = np.isnan(f32)
    if nan.any():
        out[nan] = 0x7FC0


def _combine(action: str, m: float, x: np.ndarray, y: np.ndarray, z: np.ndarray | None) -> np.ndarray:
    """x = A, y = B, z = C (work dtype, updated in place); returns the result array."""
    if action.startswith("weighted_sum"):
        if m < 0.5:                              # torch.lerp's two branches: exact at m = 0 and m = 1
            np.subtract(y, x, out=y)
            y *= m
            y += x
            return y
        np.subtract(y, x, out=x)
        x *= 1.0 - m
        np.subtract(y, x, out=x)
        return x
    np.subtract(y, z, out=y)                     # A + (B − C)·M
    y *= m
    y += x
    return y


class _Job:
    def __init__(self, ops: list[_Op], inputs: list, metadata: dict | None):
        self.inputs = inputs
        for op in ops:
            self._check(op)
        # larger items first: every tensor then starts on a multiple of its item size (as safetensors does)
        self.ops = sorted(ops, key=lambda o: -o.isz)
        header: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
        offset = 0
        for op in self.ops:
            nbytes = int(np.prod(op.shape, dtype=np.int64)) * op.isz
            header[op.key] = {"dtype": op.dtype, "shape": list(op.shape), "data_offsets": [offset, offset + nbytes]}
            op.start, op.end, offset = offset, offset + nbytes, offset + nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.head = len(raw).to_bytes(8, "little") + raw
        for op in self.ops:
            op.start += len(self.head)
            op.end += len(self.head)
        self.size = len(self.head) + offset
        self.ends = [op.end for op in self.ops]  # bisect: the first op that ends after a block's start
        self.blocks = max(1, -(-self.size // BLOCK))

    def _check(self, op: _Op) -> None:
        if op.action not in ACTIONS:
            raise MergeError(f"{op.key}: unknown action {op.action!r}")
        if op.action != "copy" and op.dtype not in FLOAT:
            raise MergeError(f"{op.key}: a merge cannot produce {op.dtype} tensors")
        n = int(np.prod(op.shape, dtype=np.int64))
        for i, key in op.srcs:
            src = self.inputs[i]
            if key not in src.entries:
                raise MergeError(f"{op.key}: input {i} has no tensor {key!r}")
            code = src.dtype(key)
            if code not in ITEMSIZE:
                raise MergeError(f"{op.key}: dtype {code} is not supported")
            if op.action == "copy" and code != op.dtype and (code not in FLOAT or op.dtype not in FLOAT):
                raise MergeError(f"{op.key}: cannot convert {code} to {op.dtype}")
            if op.action != "copy" and code not in FLOAT:
                raise MergeError(f"{op.key}: {code} tensors cannot be merged, only copied")
            if not op.action.endswith("_in4") and src.numel(key) != n:
                raise MergeError(f"{op.key}: input {i} has {src.numel(key)} elements, the output {n}")

    def block(self, j: int, scratch: _Scratch, out: Output, stop: threading.Event) -> str:
        lo, hi = j * BLOCK, min((j + 1) * BLOCK, self.size)
        buf = scratch.view
        if lo < len(self.head):
            n = min(hi, len(self.head)) - lo
            buf[:n] = self.head[lo:lo + n]
        pieces = []
        for i in range(bisect.bisect_right(self.ends, lo), len(self.ops)):
            op = self.ops[i]
            if op.start >= hi:
                break
            a, b = max(lo, op.start), min(hi, op.end)
            if b > a:
                pieces.append((op, (a - op.start) // op.isz, (b - a) // op.isz, buf[a - lo:b - lo]))
        wants: dict[int, list] = {}
        for p, (op, first, count, dst) in enumerate(pieces):
            if op.action.endswith("_in4"):  # before the block's own fetches, whose views a fetch would reuse
                whole = memoryview(self._whole_in4(op, scratch).view(np.uint8))
                dst[:] = whole[first * op.isz:(first + count) * op.isz]
                continue
            for role, (i, key) in enumerate(op.srcs):
                wants.setdefault(i, []).append((key, first, count, p, role))
        views = {}
        for i, items in wants.items():
            if stop.is_set():
                raise Stopped()
            for (_k, _f, _c, p, role), v in zip(items, self.inputs[i].fetch([w[:3] for w in items])):
                views[(p, role)] = v
        for p, (op, _first, count, dst) in enumerate(pieces):
            if not op.action.endswith("_in4"):
                self._piece(op, count, dst, [views[(p, r)] for r in range(len(op.srcs))], scratch)
        out.write(buf, lo, hi - lo)
        return pieces[0][0].key if pieces else ""

    def _piece(self, op: _Op, count: int, dst: memoryview, views: list, scratch: _Scratch) -> None:
        codes = [self.inputs[i].dtype(k) for i, k in op.srcs]
        if op.action == "copy" and codes[0] == op.dtype:
            dst[:] = views[0]
            return
        raws = [np.frombuffer(v, FLOAT[c], count) for v, c in zip(views, codes)]
        out = np.frombuffer(dst, FLOAT[op.dtype], count)
        # OpenCV reads an array of 4 or fewer elements as a scalar: tiny pieces go through numpy
        if cv2 is not None and count > 16 and {*codes, op.dtype} <= {"F16", "F32"}:
            _fast(op.action, op.m, raws, out, op.dtype)
            return
        work = _work_dtype(codes + [op.dtype])
        for s in range(0, count, SUB):
            n = min(SUB, count - s)
            ws = [_widen(r[s:s + n], c, scratch.array(f"w{role}", work, n), scratch)
                  for role, (r, c) in enumerate(zip(raws, codes))]
            res = ws[0] if op.action == "copy" else _combine(op.action, op.m, *ws, *([None] * (3 - len(ws))))
            _narrow(res, op.dtype, out[s:s + n], scratch)

    def _whole_in4(self, op: _Op, scratch: _Scratch) -> np.ndarray:
        """An inpainting A (8/9 input channels) with 4-channel B/C: only A[:, :4] is merged (small tensor)."""
        codes = [self.inputs[i].dtype(k) for i, k in op.srcs]
        work = _work_dtype(codes + [op.dtype])
        ws = []
        for (i, key), code in zip(op.srcs, codes):
            src = self.inputs[i]
            (view,) = src.fetch([(key, 0, src.numel(key))])
            w = _widen(np.frombuffer(view, FLOAT[code]), code, np.empty(src.numel(key), work), scratch)
            ws.append(w.reshape(op.shape if not ws else (op.shape[0], -1) + op.shape[2:]))
        x = ws[0]
        x[:, :4] = _combine(op.action, op.m, x[:, :4].copy(), *ws[1:], *([None] * (3 - len(ws))))
        out = np.empty(x.size, FLOAT[op.dtype])
        _narrow(x.reshape(-1), op.dtype, out, scratch)
        return out


class _InOrderHash:
    """sha256 of the output as it is written (blocks finish out of order; each waits for its turn), so the
    new checkpoint's A1111 hash needs no second read of the file."""

    def __init__(self):
        self.sha = hashlib.sha256()
        self._next = 0
        self._cv = threading.Condition()

    def feed(self, j: int, data: memoryview, stop: threading.Event) -> None:
        with self._cv:
            while self._next != j:
                if stop.is_set():
                    raise Stopped()
                self._cv.wait(0.05)
        self.sha.update(data)  # only block j's thread gets here until _next moves on
        with self._cv:
            self._next += 1
            self._cv.notify_all()


def default_workers() -> int:
    """Threads for the merge: one more than the cores (a block waiting on I/O leaves a core free), at most 8."""
    return max(2, min(8, (os.cpu_count() or 2) + 1))


def run(ops: list, inputs: list, output: str, metadata: dict | None = None, *, workers: int | None = None,
        progress=None, stop: threading.Event | None = None, sha256: bool = False) -> dict:
    """Write ``output``: ``ops`` are ``[key, dtype, shape, action, m, [[input index, input key], ...]]``.

    ``progress(done, total, key)`` is called per finished block from the calling thread; an exception it raises
    stops the merge (the partial output is removed) and is re-raised. Returns timing and memory figures, and
    the file's sha256 with ``sha256``."""
    t0 = time.perf_counter()
    stop = stop or threading.Event()
    job = _Job([_Op(*o) for o in ops], inputs, metadata)
    out = Output(output, job.size)
    hasher = _InOrderHash() if sha256 else None
    local = threading.local()
    workers = workers or default_workers()

    def task(j: int) -> str:
        if stop.is_set():
            raise Stopped()
        scratch = getattr(local, "scratch", None) or _Scratch()
        local.scratch = scratch
        key = job.block(j, scratch, out, stop)
        if hasher:
            hasher.feed(j, scratch.view[:min(BLOCK, job.size - j * BLOCK)], stop)
        return key

    ok = False
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="merge") as pool:
            pending = {pool.submit(task, j) for j in range(job.blocks)}
            done = 0
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        key = f.result()
                        done += 1
                        if progress:
                            progress(done, job.blocks, key)
            except BaseException:
                stop.set()
                for f in pending:
                    f.cancel()
                raise
        ok = True
    finally:
        direct = out.direct
        out.close()
        if not ok:
            try:
                os.unlink(output)
            except OSError:
                pass
    return {"seconds": time.perf_counter() - t0, "bytes": job.size, "blocks": job.blocks, "workers": workers,
            "direct_io": direct, "peak_rss": _peak_rss(), "torch_loaded": "torch" in sys.modules,
            "sha256": hasher.sha.hexdigest() if hasher else None}


def _peak_rss() -> int | None:
    """This process' own peak resident set (VmHWM; ru_maxrss would include what the parent had at fork)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None


def _watch_stdin(stop: threading.Event) -> None:
    # raw reads: a daemon thread blocked inside sys.stdin's buffer lock would abort the interpreter at exit
    fd = sys.stdin.fileno()
    while os.read(fd, 4096):
        pass
    stop.set()


def main() -> int:
    """Worker process: the job as one JSON line on stdin; ``P done total key`` lines, then ``OK {stats}`` or
    ``E message``. The caller keeps stdin open while it waits: end of file (the studio closed or died) stops the
    merge, so an orphaned worker never keeps writing."""
    if cv2 is not None:
        cv2.setNumThreads(1)  # the kernel's own threads share out the blocks
    stop = threading.Event()
    try:
        job = json.loads(sys.stdin.readline())
        threading.Thread(target=_watch_stdin, args=(stop,), daemon=True).start()
        inputs = []
        try:
            for path in job["inputs"]:
                inputs.append(FileInput(path))
            stats = run(job["ops"], inputs, job["output"], job.get("metadata"), workers=job.get("workers"),
                        progress=lambda d, t, k: print(f"P {d} {t} {k}", flush=True), stop=stop,
                        sha256=job.get("sha256", False))
        finally:
            for src in inputs:
                src.close()
    except Stopped:
        return 3
    except (MergeError, OSError, ValueError) as e:
        print(f"E {e}", flush=True)
        return 1
    print("OK " + json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
