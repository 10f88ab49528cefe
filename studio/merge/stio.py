"""Streaming safetensors I/O with torch tensors: read one tensor at a time, write a file whose header is known up
front. The LoRA tools (bake, merge, resize, extract) use it; checkpoint merges plan with it and stream through the
torch-free kernel (kernel.py).

Inputs are read with ``os.pread`` into a fresh buffer per tensor rather than through a memory map: pages of a
mapped file that were touched count towards the process' resident set until the kernel reclaims them, so a
merge over two 7 GB files would *look* like it holds 14 GB. ``pread`` goes through the page cache too (same
speed when warm) but leaves nothing mapped. Output is written in one pass: the header (every name, dtype,
shape and offset) is computed from the input headers before the first tensor is merged.
"""
from __future__ import annotations

import abc
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..loading.ldm_config import normalize_keys
from ..loading.state_dict import read_header

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


class TensorSource(abc.ABC):
    """Named tensors read lazily. ``infos`` is known without reading data; ``get`` returns a CPU tensor."""

    infos: dict[str, TensorInfo]
    metadata: dict[str, str]

    @abc.abstractmethod
    def get(self, key: str) -> torch.Tensor:
        """One whole tensor."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fill(fd: int, view: memoryview, offset: int, what: str) -> None:
    done = 0
    while done < len(view):  # pread may return less than asked for
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"{what}: file ended early")
        done += got


def _byte_view(t: torch.Tensor) -> memoryview:
    """Writable bytes of a contiguous tensor (any dtype, bf16 included)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class SafetensorsSource(TensorSource):
    """A .safetensors file read tensor by tensor (keys normalised like the loader does)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        header, self.metadata = read_header(self.path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        self._base = 8 + n
        renamed = normalize_keys({k: k for k in header})     # new name -> stored name
        self.stored = renamed
        self._entries = {new: header[old] for new, old in renamed.items()}
        self.infos = {k: TensorInfo(DTYPES[e["dtype"]], tuple(e["shape"])) for k, e in self._entries.items()}
        self._fd = os.open(self.path, os.O_RDONLY)

    def get(self, key: str) -> torch.Tensor:
        info = self.infos[key]
        out = torch.empty(info.shape, dtype=info.dtype)
        if out.numel():
            _fill(self._fd, _byte_view(out), self._base + self._entries[key]["data_offsets"][0], f"{self.path} {key}")
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def raw_numpy(t: torch.Tensor):
    """A CPU tensor as a numpy array of the same bits (bfloat16 as uint16, float8 as uint8), for the merge kernel."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view("uint16")
    if t.dtype.itemsize == 1 and t.dtype.is_floating_point:
        return t.view(torch.uint8).numpy()
    return t.numpy()


class DictSource(TensorSource):
    """Tensors already in memory (pickled .ckpt files, diffusers folders converted to LDM keys)."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict | None = None):
        self._t = tensors
        self.metadata = dict(metadata or {})
        self.infos = {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in tensors.items()}

    def get(self, key: str) -> torch.Tensor:
        return self._t[key].detach().cpu().clone()  # callers may update what they get in place

    def arrays(self) -> dict:
        """``{key: (safetensors dtype name, numpy array)}``: the kernel's ArrayInput form (no copies)."""
        return {k: (dtype_name(v.dtype), raw_numpy(v)) for k, v in self._t.items()}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class StreamWriter:
    """Write a .safetensors file tensor by tensor, in the order of ``plan`` (name -> TensorInfo).

    The header is written first; ``write`` must then be called once per planned name, in order. Writes go to
    ``path`` as given: callers pass a temp path and rename it when ``close`` returned.
    """

    def __init__(self, path: str | os.PathLike, plan: dict[str, TensorInfo], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._order = list(plan)
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, info in plan.items():
            header[name] = {"dtype": dtype_name(info.dtype), "shape": list(info.shape),
                            "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as safetensors does
        self._plan = plan
        self._next = 0
        self._total, self._written = offset, 0
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expect = self._order[self._next] if self._next < len(self._order) else None
        if name != expect:
            raise ValueError(f"tensor {name!r} written out of order (expected {expect!r})")
        info = self._plan[name]
        if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, planned {info.dtype} {info.shape}")
        self.write_bytes(_tensor_bytes(tensor))
        self._next += 1

    def write_bytes(self, data) -> None:
        """Append raw tensor bytes (chunked writers: the caller keeps the planned order)."""
        self._written += len(data)
        if self._written > self._total:
            raise ValueError("more tensor bytes written than planned")
        self._f.write(data)

    def close(self) -> None:
        """Flush and close; raises if tensors are missing (a partial file must never be renamed into place).

        No fsync: like A1111 and safetensors' own save_file. The temp-file-then-rename already guarantees that
        no reader ever sees a partial file; an fsync would add ~0.5 s per GB for power-loss durability only."""
        if self._f.closed:
            return
        try:
            if self._written != self._total:
                raise ValueError(f"only {self._written} of {self._total} planned tensor bytes were written")
            self._f.flush()
        finally:
            self._f.close()

    def abort(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)


def write_streaming(path, plan: dict[str, TensorInfo], produce, metadata=None, *, threaded: bool = True) -> None:
    """Write ``plan`` to ``path`` atomically, asking ``produce(name)`` for each tensor in order.

    With ``threaded`` the bytes are written by a second thread while the next tensor is produced (a queue of
    two tensors bounds the memory this costs)."""
    import queue
    import threading

    path = Path(path)
    tmp = temp_path(path)
    w = StreamWriter(tmp, plan, metadata)
    q: queue.Queue = queue.Queue(maxsize=2)
    failed: list[BaseException] = []

    def drain():
        while (item := q.get()) is not None:
            if not failed:
                try:
                    w.write(*item)
                except BaseException as e:  # reported to the producing thread
                    failed.append(e)

    writer = threading.Thread(target=drain, name="merge-writer", daemon=True) if threaded else None
    try:
        if writer:
            writer.start()
        for name in plan:
            t = produce(name)
            if failed:
                raise failed[0]
            q.put((name, t)) if writer else w.write(name, t)
        if writer:
            q.put(None)
            writer.join()
            writer = None
            if failed:
                raise failed[0]
        w.close()
        os.replace(tmp, path)
    except BaseException:
        if writer:
            failed.append(RuntimeError("stopped"))
            q.put(None)
            writer.join()
        w.abort()
        raise


def temp_path(path: Path) -> Path:
    """A hidden sibling (the registry skips dot-files) so a crash never leaves a half file in the list."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_small(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write a small in-memory state dict (LoRA outputs) with the same writer."""
    plan = {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    write_streaming(path, plan, tensors.__getitem__, metadata)

