"""Reading safetensors files tensor by tensor, memory-mapped, in any dtype (bf16 included).

`safetensors`' numpy backend cannot return bf16 tensors, so the header is read here and each tensor
is a read-only `np.memmap` view: nothing is read from disk until a slice of it is used. Files are
never unpickled; only safetensors are accepted.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from sdft_jax.errors import ModelError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
INDEX_FILE = "model.safetensors.index.json"
# The safetensors format's own limit on the JSON header: a larger length is a corrupt or foreign file.
MAX_HEADER_BYTES = 100_000_000


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its file, safetensors dtype name, shape and byte range in the file."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class SafetensorsDir:
    """All tensors of a model directory (`model.safetensors`, or shards listed by the index file).

    Everything is checked when it is opened, and refused with a `ModelError` naming the file (and the
    tensor): an index that does not map names to shard files of this directory (a path that leads
    out of it, absolute or through a symlink, is refused: a model directory is a unit), a missing
    shard, a header that is not a safetensors header, a tensor whose byte range lies outside its file,
    overlaps another, or does not match its shape and dtype, a tensor in two files, and a tensor the
    index places in a file that does not hold it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._entries: dict[str, TensorEntry] = {}
        index = self._index()
        files = sorted(set(index.values())) if index is not None else self._unindexed_files()
        for file in files:
            self._read_header(file)
        if index is not None:
            for name, file in index.items():
                held = self._entries.get(name)
                if held is None or held.file != file:
                    raise ModelError(f"{os.path.join(self.path, INDEX_FILE)}: tensor {name!r} is mapped to "
                                     f"{os.path.relpath(file, self.path)}, which does not hold it")

    def _index(self) -> dict[str, str] | None:
        """The index's tensor name -> shard path (inside this directory), or None without an index."""
        index = os.path.join(self.path, INDEX_FILE)
        if not os.path.exists(index):
            return None
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # JSON, UTF-8, structure
            raise ModelError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index}: weight_map must be a non-empty object of tensor name -> shard file")
        out = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or not file.endswith(".safetensors"):
                raise ModelError(f"{index}: tensor {name!r} is mapped to {file!r}, not a .safetensors file name")
            normal = os.path.normpath(file)
            if os.path.isabs(file) or normal == ".." or normal.startswith(".." + os.sep):
                raise ModelError(f"{index}: tensor {name!r} is mapped to {file!r}, outside the model directory")
            out[name] = os.path.join(self.path, normal)
        missing = sorted({os.path.relpath(f, self.path) for f in out.values() if not os.path.isfile(f)})
        if missing:
            raise ModelError(f"{index}: the index lists shard files that are missing: {missing}")
        return out

    def _unindexed_files(self) -> list[str]:
        files = sorted(glob.glob(os.path.join(self.path, "*.safetensors")))
        if files:
            return files
        pickles = [os.path.basename(p) for p in glob.glob(os.path.join(self.path, "*.bin"))
                   + glob.glob(os.path.join(self.path, "*.pt")) + glob.glob(os.path.join(self.path, "*.pth"))]
        if pickles:
            raise ModelError(
                f"{self.path}: only pickle checkpoints found ({', '.join(sorted(pickles))}); sdft-jax never "
                "unpickles weights. Convert them to safetensors first (e.g. save_pretrained(..., "
                "safe_serialization=True) in a trusted environment)."
            )
        raise ModelError(f"{self.path}: no model weights (*.safetensors) found")

    def _read_header(self, file: str) -> None:
        check_inside(self.path, file)
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelError(f"{file}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES:
                raise ModelError(f"{file}: header length {n:,} bytes is over the safetensors limit of "
                                 f"{MAX_HEADER_BYTES:,} (not a safetensors file, or corrupt)")
            if n > size - 8:
                raise ModelError(f"{file}: truncated or corrupt safetensors file (header of {n} bytes, file of {size})")
            try:
                header = json.loads(f.read(n))
            except (ValueError, RecursionError) as e:  # JSON, UTF-8, an over-long number, deep nesting
                raise ModelError(f"{file}: corrupt safetensors header ({type(e).__name__}: {e})") from None
        if not isinstance(header, dict):
            raise ModelError(f"{file}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ModelError(f"{file}: corrupt safetensors header (__metadata__ must map names to strings)")
        entries = {name: _entry(file, name, info, 8 + n, size) for name, info in header.items()}
        ranges = sorted((e.start, e.end, name) for name, e in entries.items() if e.end > e.start)
        for (_, end, a), (start, _, b) in zip(ranges, ranges[1:]):
            if start < end:
                raise ModelError(f"{file}: tensors {a!r} and {b!r} overlap in the file (corrupt header)")
        for name, entry in entries.items():
            if name in self._entries:
                raise ModelError(f"{file}: tensor {name!r} is also in {self._entries[name].file}")
            self._entries[name] = entry

    @property
    def names(self) -> set[str]:
        return set(self._entries)

    def entry(self, name: str) -> TensorEntry:
        """Where tensor `name` lies (its file, dtype, shape, byte range)."""
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def read(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of one tensor."""
        e = self._entries[name]
        dtype = _DTYPES[e.dtype]
        if not e.shape:
            return np.fromfile(e.file, dtype=dtype, count=1, offset=e.start).reshape(())
        if e.start == e.end:  # an empty tensor: nothing to map
            return np.empty(e.shape, dtype)
        return np.memmap(e.file, dtype=dtype, mode="r", offset=e.start, shape=e.shape)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(file: str, name: str, info, base: int, size: int) -> TensorEntry:
    """One header entry, checked against the safetensors format and the file's size."""
    where = f"{file}: tensor {name!r}"
    if not isinstance(info, dict):
        raise ModelError(f"{where}: header entry is a {type(info).__name__}, not an object")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ModelError(f"{where}: unsupported dtype {dtype!r} (supported: {', '.join(_DTYPES)})")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ModelError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    offsets = info.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise ModelError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    start, end = offsets
    if base + end > size:
        raise ModelError(f"{where}: bytes [{start}, {end}) lie outside the file's {size - base} data bytes "
                         "(truncated or corrupt)")
    nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
    if end - start != nbytes:
        raise ModelError(f"{where}: holds {end - start} bytes, but shape {shape} of {dtype} needs {nbytes}")
    return TensorEntry(file, dtype, tuple(shape), base + start, base + end)


def check_inside(model_dir: str, file: str) -> None:
    """Refuses a file of `model_dir` that resolves (through symlinks) to a place outside it.

    One exception: the Hugging Face hub cache, whose `snapshots/<revision>/` files are symlinks into
    the repository's `blobs/` folder beside `snapshots/`."""
    root, real = os.path.realpath(model_dir), os.path.realpath(file)
    if os.path.commonpath([root, real]) == root:
        return
    folder = root
    while os.path.dirname(folder) != folder:
        parent = os.path.dirname(folder)
        if os.path.basename(parent) == "snapshots":
            blobs = os.path.join(os.path.dirname(parent), "blobs")
            if os.path.dirname(real) == blobs:
                return
            break
        folder = parent
    raise ModelError(f"{file}: resolves to {real}, outside the model directory {model_dir}")
