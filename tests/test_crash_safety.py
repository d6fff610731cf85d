"""Crash safety: SIGKILL at random moments, one process per block (lock files), NaN stops cleanly."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dbconvert import distributed, locks
from dbconvert.checkpoint import load_weights
from dbconvert.errors import DbconvertError
from dbconvert.rundir import Run
from dbconvert.train import train_block


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in distributed.ENV_KEYS}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _check_readable(run: Run, name: str) -> int:
    """Every file a killed run left is readable; returns the checkpointed step."""
    out = run.model_dir(name)
    for path in out.glob("*.safetensors"):
        load_weights(path)  # raises CheckpointError on a truncated file
    json.loads((out / "state.json").read_text()) if (out / "state.json").exists() else None
    return run.status(name).step


def _train_quietly(root: str, steps: int) -> None:
    import io
    import sys

    sys.stderr = io.StringIO()
    train_block(
        Run.open(root), 0, steps=steps, overrides=["train.checkpoint_every=1", "train.log_every=1"], progress=False
    )


def _wait_for_progress(run: Run, proc, before: int) -> None:  # noqa: ANN001
    deadline = time.monotonic() + 60
    while run.status("block-00").step <= before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def test_sigkill_at_random_moments_never_leaves_an_unreadable_checkpoint(tiny_run: Run) -> None:
    """Kill the CLI (start-up, then mid-training), then forked trainers at random moments of a
    checkpoint-every-step loop; after each kill every file loads; a rerun finishes."""
    import multiprocessing

    rng = random.Random(6)
    total = 80
    cmd = [
        sys.executable,
        "-m",
        "dbconvert",
        "train-block",
        "0",
        "--run",
        str(tiny_run.root),
        "--quiet",
        "--steps",
        str(total),
        "train.checkpoint_every=1",
        "train.log_every=1",
    ]
    steps, kills = [], 0
    for i in range(2):  # the real command: killed during start-up, then once it trains
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i == 0:
            time.sleep(rng.uniform(0.0, 1.0))
        else:
            _wait_for_progress(tiny_run, proc, tiny_run.status("block-00").step)
            time.sleep(rng.uniform(0.0, 0.2))
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        steps.append(_check_readable(tiny_run, "block-00"))
    train_block(tiny_run, 1, steps=1, progress=False)  # lazy imports done once, before forking
    fork = multiprocessing.get_context("fork")
    for _ in range(6):  # forked trainers (no interpreter start-up), killed at random moments
        child = fork.Process(target=_train_quietly, args=(str(tiny_run.root), total))
        child.start()
        before = tiny_run.status("block-00").step
        deadline = time.monotonic() + 60
        while tiny_run.status("block-00").step <= before and child.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.15))
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.join()
        steps.append(_check_readable(tiny_run, "block-00"))
    assert kills >= 7 and steps == sorted(steps) and 0 < steps[-1] < total, steps
    lock = tiny_run.model_dir("block-00") / locks.LOCK_NAME
    assert lock.exists()  # left by the last killed process: stale, taken over below

    notes: list[str] = []
    result = train_block(
        tiny_run,
        0,
        steps=total,
        overrides=["train.checkpoint_every=1", "train.log_every=1"],
        progress=False,
        note=notes.append,
    )
    assert result.step == total and any("took over the stale lock" in n for n in notes)
    assert tiny_run.status("block-00").step == total and not lock.exists()
    assert not list(tiny_run.model_dir("block-00").glob(".*.tmp"))
    records = [json.loads(x) for x in tiny_run.metrics_path("block-00").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, total + 1))


def _die_between_the_final_state_and_the_exports(root: str, steps: int) -> None:
    """A trainer that SIGKILLs itself after writing the final state file, before the final model weights."""
    import io

    import dbconvert.train as train_mod

    real = train_mod.save_weights

    def save(path: Path, state, metadata=None) -> None:  # noqa: ANN001
        if Path(path).name == "model.safetensors" and (metadata or {}).get("step") == str(steps):
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, state, metadata=metadata)

    train_mod.save_weights = save
    sys.stderr = io.StringIO()
    train_block(Run.open(root), 3, steps=steps, progress=False)


def test_sigkill_in_the_final_checkpoint_is_repaired_on_rerun(tiny_run: Run) -> None:
    """The last moment a kill can hit: the state file says "finished", the exports one checkpoint behind."""
    import multiprocessing

    from safetensors import safe_open

    child = multiprocessing.get_context("fork").Process(
        target=_die_between_the_final_state_and_the_exports, args=(str(tiny_run.root), 4)
    )
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    out = tiny_run.model_dir("block-03")
    assert _check_readable(tiny_run, "block-03") == 2  # state.json and the weights: the checkpoint of step 2
    with safe_open(str(out / "state.safetensors"), "pt") as fh:
        assert (fh.metadata() or {})["step"] == "4"

    notes: list[str] = []
    result = train_block(tiny_run, 3, steps=4, progress=False, note=notes.append)
    assert result.step == 4 and result.last_loss is None  # re-exported, nothing trained again
    assert any("took over the stale lock" in n for n in notes) and not (out / locks.LOCK_NAME).exists()
    assert _check_readable(tiny_run, "block-03") == 4
    for name in ("model", "ema"):
        with safe_open(str(out / f"{name}.safetensors"), "pt") as fh:
            assert (fh.metadata() or {})["step"] == "4"


def test_a_second_process_on_a_locked_block_refuses(tiny_run: Run) -> None:
    lock = tiny_run.model_dir("block-01") / locks.LOCK_NAME
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from dbconvert.locks import acquire; "
            f"acquire({str(lock)!r}, 'block-01'); print('held', flush=True); time.sleep(120)",
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        cli = subprocess.run(
            [sys.executable, "-m", "dbconvert", "train-block", "1", "--run", str(tiny_run.root), "-q"],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 2
        err = cli.stderr.strip()
        assert len(err.splitlines()) == 1, err
        assert f"already being trained by pid {holder.pid} on {socket.gethostname()}" in err
    finally:
        holder.kill()
        holder.wait()
    assert tiny_run.status("block-01").step == 0  # the refused process wrote nothing
    # the holder is dead now: its lock is stale and the next run takes it over with a note
    notes: list[str] = []
    train_block(tiny_run, 1, progress=False, note=notes.append)
    assert tiny_run.status("block-01").finished and notes and f"pid {holder.pid}" in notes[0]


def test_lock_from_another_host_is_refused_and_a_reused_pid_is_stale(tmp_path: Path) -> None:
    lock = tmp_path / "train.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "token": "x"}))
    with pytest.raises(locks.LockedError, match="pid .* on elsewhere"):
        locks.acquire(lock, "block-09")
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "0", "token": "y"}))
    assert locks.is_stale(json.loads(lock.read_text()))  # our pid, but started at another time: reused
    with locks.hold(lock, "block-09") as owner:
        assert json.loads(lock.read_text())["token"] == owner["token"]
        with pytest.raises(locks.LockedError, match=f"pid {os.getpid()}"):
            locks.acquire(lock, "block-09")
    assert not lock.exists()


def test_nan_loss_stops_with_the_last_good_checkpoint_intact(tiny_run: Run) -> None:
    train_block(tiny_run, 2, progress=False)  # 4 good steps, checkpointed
    state = tiny_run.model_dir("block-02") / "state.safetensors"
    good = state.read_bytes()
    with pytest.raises(DbconvertError, match="loss became (nan|inf).*last checkpoint is intact"):
        train_block(tiny_run, 2, steps=50, overrides=["train.lr=1e30", "train.checkpoint_every=100"], progress=False)
    assert state.read_bytes() == good and tiny_run.status("block-02").step == 4
    weights = load_weights(state)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert not (tiny_run.model_dir("block-02") / locks.LOCK_NAME).exists()
