"""Device selection and the busy-CPU note (issue 33: torch's one thread per core collapses on shared cores)."""

from __future__ import annotations

import pytest
import torch

from dbconvert.devices import busy_cpu_note, resolve_device
from dbconvert.errors import DbconvertError


def test_auto_is_cpu_here_and_unknown_devices_are_one_line() -> None:
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(DbconvertError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(DbconvertError, match="unknown device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.parametrize(
    ("threads", "load", "cores", "noted"),
    [
        (2, 1.9, 2, True),  # one other job on a 2-core machine: the case measured at 12x slower
        (2, 0.2, 2, False),  # idle: torch's default is the faster
        (1, 1.9, 2, False),  # already one thread
        (4, 2.0, 8, False),  # room to spare
        (8, 3.0, 8, True),
    ],
)
def test_busy_cpu_note_only_when_the_threads_do_not_fit_beside_the_load(
    threads: int, load: float, cores: int, noted: bool
) -> None:
    note = busy_cpu_note(torch.device("cpu"), threads=threads, load=load, cores=cores)
    assert (note is not None) == noted
    if noted:
        assert note.startswith("note: the CPU is busy") and "OMP_NUM_THREADS=1" in note and "\n" not in note
    assert busy_cpu_note(torch.device("meta"), threads=threads, load=load, cores=cores) is None  # not a CPU
