"""The streaming safetensors reader and writer (against the safetensors package, both ways) and LazyState."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dbconvert.tensorio import LazyState, SafetensorsFile, Spec, cast_state, floating_dtype, spec_of, write_safetensors

TENSORS = {
    "bf16": torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
    "f32": torch.randn(7, generator=torch.Generator().manual_seed(1)),
    "f16": torch.randn(2, 2, 2).to(torch.float16),
    "i64": torch.arange(6).reshape(2, 3),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
}


def test_our_writer_is_read_by_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {k: spec_of(v) for k, v in TENSORS.items()}, TENSORS.__getitem__, {"step": "3"})
    back = load_file(str(path))
    assert back.keys() == TENSORS.keys()
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in TENSORS.items())
    assert SafetensorsFile(path).metadata == {"step": "3"}


def test_our_reader_reads_what_safetensors_wrote(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    save_file({k: v.contiguous() for k, v in TENSORS.items()}, str(path), metadata={"a": "b"})
    reader = SafetensorsFile(path)
    assert reader.metadata == {"a": "b"} and set(reader.specs) == set(TENSORS)
    for key, value in TENSORS.items():
        assert reader.specs[key] == spec_of(value)
        got = reader.read(key)
        assert torch.equal(got, value) and got.dtype == value.dtype


def test_the_writer_refuses_a_tensor_unlike_its_spec(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="the header says"):
        write_safetensors(tmp_path / "x.safetensors", {"a": Spec(torch.float32, (2,))}, lambda k: torch.zeros(3))


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda b: b[:4], "shorter than a safetensors header"),
        (lambda b: b[:-8], "outside the file"),
        (lambda b: b[:8] + b"{not json" + b[17:], "not JSON"),
        (lambda b: (10**12).to_bytes(8, "little") + b[8:], "does not fit"),
    ],
)
def test_damaged_files_are_value_errors(tmp_path: Path, damage, match: str) -> None:
    path = tmp_path / "d.safetensors"
    save_file({"a": torch.ones(64), "b": torch.ones(3)}, str(path))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=match):
        SafetensorsFile(path)


def test_a_lazy_state_makes_tensors_only_when_asked_and_knows_their_specs() -> None:
    made: list[str] = []

    def loader(key: str):
        return lambda: (made.append(key), torch.ones(2, dtype=torch.bfloat16))[1]

    state = LazyState({"a": loader("a"), "b": loader("b")}, {k: Spec(torch.bfloat16, (2,)) for k in "ab"})
    assert list(state) == ["a", "b"] and "a" in state and len(state) == 2 and state.nbytes == 8
    assert made == []
    cast = cast_state(state, torch.float32)
    assert cast.specs["a"] == Spec(torch.float32, (2,)) and made == []  # still nothing read
    assert cast["b"].dtype == torch.float32 and made == ["b"]
    assert floating_dtype(state.specs) == torch.bfloat16
    assert floating_dtype({"i": Spec(torch.int64, (3,))}) == torch.float32
