"""`train-all --parallel N`: every untrained or unfinished block, as separate processes.

Each block is trained by its own `python -m dbconvert train-block I --run RUN` process, so
blocks are as independent as when started by hand: at most N run at once, each pinned to
one device through CUDA_VISIBLE_DEVICES when there are CUDA devices (on the CPU the cores
are shared out through OMP_NUM_THREADS). Output goes to RUN/logs/block-XX.log; a live
table shows each block's step, loss and speed from RUN/metrics/block-XX.jsonl. A block that
fails is reported with its log and the others go on; rerunning continues every block from
its last checkpoint. A block locked by a live process (this machine or another one sharing
the run folder) is left to that process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbconvert import locks
from dbconvert.distributed import ENV_KEYS
from dbconvert.rundir import Run

Launcher = Callable[[Run, int], list[str]]

PENDING, RUNNING, DONE, FAILED, FINISHED, BUSY = "pending", "running", "done", "failed", "finished", "busy"


@dataclass
class BlockJob:
    index: int
    log: Path
    state: str = PENDING
    device: str | None = None
    returncode: int | None = None
    detail: str = ""
    process: subprocess.Popen | None = field(default=None, repr=False)


@dataclass
class TrainAllResult:
    jobs: list[BlockJob]

    @property
    def failed(self) -> list[BlockJob]:
        return [j for j in self.jobs if j.state == FAILED]


def default_launcher(
    steps: int | None = None, epochs: float | None = None, overrides: list[str] | None = None
) -> Launcher:
    """`python -m dbconvert train-block I --run RUN -q [--steps] [--epochs] [overrides]`."""

    def argv(run: Run, index: int) -> list[str]:
        cmd = [sys.executable, "-m", "dbconvert", "train-block", str(index), "--run", str(run.root), "--quiet"]
        if steps is not None:
            cmd += ["--steps", str(steps)]
        if epochs is not None:
            cmd += ["--epochs", str(epochs)]
        return cmd + list(overrides or [])

    return argv


def cuda_devices() -> list[str]:
    """The CUDA devices this process may use (honouring CUDA_VISIBLE_DEVICES), or none."""
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d.strip() for d in visible.split(",") if d.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def blocks_to_train(
    run: Run, steps: int | None = None, epochs: float | None = None, overrides: list[str] | None = None
) -> tuple[list[int], list[int]]:
    """(blocks to launch, blocks already finished) for the requested length of training."""
    from dbconvert.train import training_recipe

    recipe = training_recipe(run, overrides, steps, epochs)
    todo, finished = [], []
    for block in run.blocks:
        status = run.status(Run.block_name(block.index))
        if recipe.train.steps is not None:
            done = status.step >= recipe.train.steps
        else:  # epochs: the total depends on the data; trust state.json only for the unchanged recipe
            done = status.finished and epochs is None and not overrides
        (finished if done else todo).append(block.index)
    return todo, finished


def train_all(
    run: Run,
    parallel: int = 1,
    steps: int | None = None,
    epochs: float | None = None,
    overrides: list[str] | None = None,
    devices: list[str] | None = None,
    launcher: Launcher | None = None,
    console: Any = None,
    live: bool = True,
    poll: float = 0.5,
) -> TrainAllResult:
    """Train every unfinished block of `run`, at most `parallel` processes at a time."""
    from dbconvert.errors import DbconvertError

    if parallel < 1:
        raise DbconvertError(f"--parallel must be at least 1, got {parallel}")
    launcher = launcher or default_launcher(steps, epochs, overrides)
    devices = cuda_devices() if devices is None else devices
    say = (lambda msg: console.print(msg, highlight=False, markup=False)) if console is not None else (lambda msg: None)
    todo, finished = blocks_to_train(run, steps, epochs, overrides)
    logs = run.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    jobs = {i: BlockJob(i, logs / f"{Run.block_name(i)}.log") for i in range(run.num_blocks)}
    for i in finished:
        jobs[i].state = FINISHED
    if devices and parallel > len(devices):
        say(f"note: --parallel {parallel} but {len(devices)} device(s): blocks will share devices")
    queue = list(todo)
    threads = None
    if not devices and not os.environ.get("OMP_NUM_THREADS"):
        threads = str(max(1, (os.cpu_count() or 1) // max(1, min(parallel, len(queue) or 1))))

    def start(job: BlockJob) -> None:
        owner = locks.current_owner(run.model_dir(Run.block_name(job.index)) / locks.LOCK_NAME)
        if owner is not None:
            job.state, job.detail = BUSY, f"being trained by {locks.describe(owner)}"
            say(f"block {job.index}: {job.detail}; left to it")
            return
        env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
        if devices:
            in_use = [j.device for j in jobs.values() if j.state == RUNNING]
            job.device = min(devices, key=lambda d: (in_use.count(d), devices.index(d)))
            env["CUDA_VISIBLE_DEVICES"] = job.device
        elif threads:
            env["OMP_NUM_THREADS"] = threads
        with open(job.log, "a") as fh:
            fh.write(
                f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(launcher(run, job.index))}"
                f"{' (CUDA_VISIBLE_DEVICES=' + job.device + ')' if job.device else ''}\n"
            )
            fh.flush()
            job.process = subprocess.Popen(
                launcher(run, job.index), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        job.state = RUNNING
        say(
            f"block {job.index}: started (pid {job.process.pid}{', device ' + job.device if job.device else ''}); "
            f"log {job.log}"
        )

    def reap(job: BlockJob) -> None:
        assert job.process is not None
        code = job.process.poll()
        if code is None:
            return
        job.returncode = code
        if code == 0:
            job.state = DONE
            say(f"block {job.index}: done")
            return
        tail = _last_line(job.log)
        if "is already being trained by" in tail:
            job.state, job.detail = BUSY, tail
            say(f"block {job.index}: {tail}")
            return
        how = (
            f"killed by {signal.Signals(-code).name}"
            if code < 0 and -code in signal.valid_signals()
            else f"exit code {code}"
        )
        job.state, job.detail = FAILED, f"{how}: {tail}" if tail else how
        say(f"block {job.index}: FAILED ({job.detail}); log {job.log}")

    from contextlib import nullcontext

    live_ctx: Any = nullcontext()
    if live and console is not None:
        from rich.live import Live

        live_ctx = Live(_table(run, jobs), console=console, refresh_per_second=2, transient=False)
    try:
        with live_ctx as display:
            while True:
                for job in jobs.values():
                    if job.state == RUNNING:
                        reap(job)
                while queue and sum(j.state == RUNNING for j in jobs.values()) < parallel:
                    start(jobs[queue.pop(0)])
                if display is not None:
                    display.update(_table(run, jobs))
                if not queue and not any(j.state == RUNNING for j in jobs.values()):
                    break
                time.sleep(poll)
        if display is not None:
            console.line()
    except KeyboardInterrupt:
        for job in jobs.values():
            if job.state == RUNNING and job.process is not None:
                job.process.send_signal(signal.SIGINT)
        for job in jobs.values():
            if job.state == RUNNING and job.process is not None:
                try:
                    job.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    job.process.kill()
        raise
    return TrainAllResult(list(jobs.values()))


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def last_record(path: Path) -> dict[str, Any] | None:
    """The last complete JSON line of a metrics file (None when there is none yet)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in reversed(text.splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def _table(run: Run, jobs: dict[int, BlockJob]) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"train-all: {run.root}"))
    for col in ("block", "state", "step", "loss", "examples/s", "device", "log"):
        table.add_column(col, justify="right" if col in ("step", "loss", "examples/s") else "left")
    styles = {RUNNING: "cyan", DONE: "green", FINISHED: "green", FAILED: "bold red", BUSY: "yellow", PENDING: "dim"}
    for i, job in sorted(jobs.items()):
        name = Run.block_name(i)
        rec = last_record(run.metrics_path(name)) or {}
        status = run.status(name)
        step = rec.get("step", status.step)
        total = rec.get("total_steps", status.total_steps)
        loss = rec.get("loss")
        speed = rec.get("examples_per_s")
        state = job.state if job.state != FAILED else f"failed ({job.returncode})"
        table.add_row(
            str(i),
            Text(state, style=styles.get(job.state, "")),
            f"{step}/{total or '?'}",
            f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
            f"{speed:,.0f}" if isinstance(speed, (int, float)) and job.state == RUNNING else "-",
            job.device or "cpu",
            str(job.log) if job.state in (RUNNING, FAILED) else "",
        )
    return table
