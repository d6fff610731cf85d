"""Device selection: `auto` picks CUDA, then Apple MPS, then CPU, so recipes never name hardware."""

from __future__ import annotations

import os

import torch

from dbconvert.errors import DbconvertError


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for a recipe's `train.device` (auto | cpu | cuda | cuda:N | mps)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DbconvertError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DbconvertError(f"device {name!r} was asked for but CUDA is not available here; use device=auto")
    return device


def busy_cpu_note(
    device: torch.device, threads: int | None = None, load: float | None = None, cores: int | None = None
) -> str | None:
    """A one-line note when CPU training starts on cores other work already holds (issue 33).

    Measured on the 2-core machine (dit-tiny-digits, 60 steps of block 0 with start-up): idle, 2 threads 8.5-9.3 s
    against 1 thread 10.1-11.5 s; beside one busy process, 2 threads 17.0-18.0 s against 1 thread 10.2-10.4 s (a
    user saw 0.29 against 3.58 steps/s). The default stays torch's, one thread per core, the faster when the machine
    is idle; the thread count is never chosen by load, because a run's numbers differ in the last bits between
    thread counts, and deterministic by seed must not depend on what else was running. Hence a note, not a switch.
    """
    if device.type != "cpu":
        return None
    threads = threads if threads is not None else torch.get_num_threads()
    cores = cores if cores is not None else (os.cpu_count() or 1)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # not on every platform
            return None
    if threads <= 1 or load < 0.75 or load + threads <= cores + 0.5:
        return None
    return (
        f"note: the CPU is busy (load {load:.1f} on {cores} cores) and torch uses {threads} threads; on shared "
        "cores that can run 10x slower: OMP_NUM_THREADS=1 is faster while it stays busy (the last bits of the "
        "results differ between thread counts)"
    )
