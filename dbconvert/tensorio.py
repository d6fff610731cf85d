"""Tensors one at a time: a streaming safetensors reader and writer, and lazy state dicts over checkpoint files.

A checkpoint of several GB must convert in about one block's memory, so nothing here reads or writes a whole
file at once. `safetensors.torch.load_file` reads a whole file and `save_file` serialises a whole state dict into
one buffer (twice the bytes at its peak); `safe_open` maps the file, and every page it touches stays in the
process's resident set until the file is closed. The reader below instead parses the header (8 bytes of
little-endian length, a JSON table of dtype / shape / byte offsets) and reads each tensor with `readinto` straight
into its own storage; the writer writes the header from the tensors' specs, then each tensor's bytes in turn.
Both follow the format's specification (https://github.com/huggingface/safetensors), and the tests check them
against the safetensors package in both directions.

`LazyState` is a read-only mapping (a state dict) whose tensors are made when asked for: by reading them from a
checkpoint, or by a function (a conversion's transform, a new parameter's init). Its keys, and each tensor's
dtype and shape, are known without reading anything.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000
"""The format's own limit on the header's size (bytes)."""


@dataclass(frozen=True)
class Spec:
    """What a tensor is, without its data."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def spec_of(tensor: torch.Tensor) -> Spec:
    return Spec(tensor.dtype, tuple(tensor.shape))


class SafetensorsFile:
    """One `.safetensors` file, read tensor by tensor (no memory map, no whole-file read).

    Raises ValueError with a short reason when the header is not a valid safetensors header or the file is
    shorter than its header says (a truncated download); callers turn it into their own one-line error.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER, size - 8):
                raise ValueError(f"header length {length} does not fit the file's {size} bytes")
            try:
                header = json.loads(fh.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ValueError("header is not JSON") from None
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        base = 8 + length
        self.specs: dict[str, Spec] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        for name, entry in header.items():
            try:
                dtype, shape = DTYPES[entry["dtype"]], tuple(int(d) for d in entry["shape"])
                start, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"header entry {name!r} is not a tensor description") from None
            spec = Spec(dtype, shape)
            if end - start != spec.nbytes or start < 0 or base + end > size:
                raise ValueError(f"tensor {name!r} lies outside the file (truncated?)")
            self.specs[name] = spec
            self.offsets[name] = (base + start, base + end)

    def read(self, name: str) -> torch.Tensor:
        spec = self.specs[name]
        start, end = self.offsets[name]
        tensor = torch.empty(spec.shape, dtype=spec.dtype)
        if end > start:
            buffer = tensor.reshape(-1).view(torch.uint8).numpy()
            with open(self.path, "rb") as fh:
                fh.seek(start)
                if fh.readinto(memoryview(buffer)) != end - start:
                    raise ValueError(f"tensor {name!r} is cut short (truncated file)")
        return tensor


def write_safetensors(
    path: str | Path,
    specs: Mapping[str, Spec],
    get: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    on_tensor: Callable[[int], None] | None = None,
) -> None:
    """Write a safetensors file whose tensors `get(name)` makes one at a time (each is freed before the next).

    `specs` fixes the header first; a tensor whose dtype or shape differs from its spec is a ValueError.
    `on_tensor(bytes)` is told the size of every tensor written (for progress).
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    names = list(specs)
    for name in names:
        spec = specs[name]
        header[name] = {
            "dtype": NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for name in names:
            tensor = get(name).detach()
            if spec_of(tensor) != specs[name]:
                raise ValueError(
                    f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, the header says "
                    f"{specs[name].dtype} {specs[name].shape}"
                )
            tensor = tensor.to("cpu").contiguous()
            if tensor.numel():
                fh.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            if on_tensor is not None:
                on_tensor(specs[name].nbytes)
            del tensor


class LazyState(Mapping[str, torch.Tensor]):
    """A state dict whose tensors are made on access (`loaders[key]()`), with every spec known up front.

    Each access makes the tensor anew (nothing is cached), so holding a LazyState costs no tensor memory.
    """

    def __init__(
        self,
        loaders: Mapping[str, Callable[[], torch.Tensor]],
        specs: Mapping[str, Spec],
        release: Callable[[], None] | None = None,
        origins: Mapping[str, str] | None = None,
    ) -> None:
        if set(loaders) != set(specs):
            raise ValueError("a LazyState needs one spec per loader")
        self.loaders = dict(loaders)
        self.specs = dict(specs)
        self.on_release = release
        self.origins = dict(origins or {})
        """Key -> the checkpoint tensor it is read from (keys made otherwise are absent): the key map, as data."""

    def release(self) -> None:
        """Drop what the files behind this state keep mapped (a memory-mapped `.pt`); the next access maps again."""
        if self.on_release is not None:
            self.on_release()

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.loaders[key]()

    def __iter__(self) -> Iterator[str]:
        return iter(self.loaders)

    def __len__(self) -> int:
        return len(self.loaders)

    def __contains__(self, key: object) -> bool:
        return key in self.loaders

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())


def release(state: Mapping[str, torch.Tensor]) -> None:
    """`state.release()` for a LazyState; nothing for other mappings."""
    if isinstance(state, LazyState):
        state.release()


def specs_of(state: Mapping[str, torch.Tensor]) -> dict[str, Spec]:
    """Every tensor's spec: read from a LazyState without making any tensor, else from the tensors."""
    if isinstance(state, LazyState):
        return dict(state.specs)
    return {k: spec_of(v) for k, v in state.items()}


def cast_state(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> Mapping[str, torch.Tensor]:
    """`state` with every floating tensor in `dtype` (None: unchanged), lazily when `state` is lazy."""
    if dtype is None:
        return state

    def cast(spec: Spec) -> Spec:
        return Spec(dtype, spec.shape) if spec.dtype.is_floating_point else spec

    if isinstance(state, LazyState):
        loaders = {k: (lambda f=f: to_dtype(f(), dtype)) for k, f in state.loaders.items()}
        return LazyState(loaders, {k: cast(s) for k, s in state.specs.items()}, state.release, state.origins)
    return {k: to_dtype(v, dtype) for k, v in state.items()}


def to_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.dtype.is_floating_point else tensor


def floating_dtype(specs: Mapping[str, Spec]) -> torch.dtype:
    """The floating dtype that holds most of the bytes of `specs` (float32 when there is none)."""
    totals: dict[torch.dtype, int] = {}
    for spec in specs.values():
        if spec.dtype.is_floating_point:
            totals[spec.dtype] = totals.get(spec.dtype, 0) + spec.nbytes
    return max(totals, key=lambda d: totals[d]) if totals else torch.float32


def write_random_safetensors(
    path: str | Path,
    specs: Mapping[str, Spec],
    seed: int,
    ones: Callable[[str], bool] = lambda key: False,
    on_tensor: Callable[[int], None] | None = None,
) -> None:
    """A safetensors file of random N(0, 0.02^2) tensors (of ones where `ones(key)`), one tensor at a time: a
    checkpoint of any size for benchmarks (`bench split`)."""
    gen = torch.Generator().manual_seed(seed)

    def random(key: str) -> torch.Tensor:
        spec = specs[key]
        if ones(key):
            return torch.ones(spec.shape, dtype=spec.dtype)
        return (torch.randn(spec.shape, generator=gen) * 0.02).to(spec.dtype)

    write_safetensors(path, specs, random, {"format": "pt"}, on_tensor)
