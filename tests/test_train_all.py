"""train-all --parallel N: scheduling, device pinning, failures reported, rerun continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dbconvert import distributed, locks
from dbconvert.rundir import Run
from dbconvert.split import split
from dbconvert.train_all import DONE, FAILED, train_all

FAKE = """
import json, os, sys, time
i = int(sys.argv[1]); out = sys.argv[2]
start = time.time(); time.sleep(0.4)
open(os.path.join(out, f"{i}.json"), "w").write(json.dumps(
    {"start": start, "end": time.time(), "device": os.environ.get("CUDA_VISIBLE_DEVICES")}))
if i == 2:
    print("error: block 2 broke"); sys.exit(2)
"""


def test_at_most_n_at_a_time_one_device_each_and_a_failure_does_not_stop_the_others(
    tiny_run: Run, tmp_path: Path
) -> None:
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    out = tmp_path / "out"
    out.mkdir()
    result = train_all(
        tiny_run,
        parallel=2,
        devices=["3", "5"],
        poll=0.05,
        launcher=lambda run, i: [sys.executable, str(script), str(i), str(out)],
    )
    states = {j.index: j.state for j in result.jobs}
    assert states == {0: DONE, 1: DONE, 2: FAILED, 3: DONE}
    failed = result.failed[0]
    assert failed.log == tiny_run.root / "logs" / "block-02.log" and "block 2 broke" in failed.detail
    assert "block 2 broke" in failed.log.read_text()
    runs = [json.loads((out / f"{i}.json").read_text()) for i in range(4)]
    for t in (r["start"] + 0.2 for r in runs):  # never more than 2 at once, never 2 on one device
        active = [r for r in runs if r["start"] <= t <= r["end"]]
        assert len(active) <= 2 and len({r["device"] for r in active}) == len(active)
    assert {r["device"] for r in runs} == {"3", "5"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in distributed.ENV_KEYS}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_train_all_trains_every_block_and_a_killed_block_finishes_on_rerun(in_tmp: Path) -> None:
    from dbconvert.config import load_recipe

    from tests.conftest import TINY_OVERRIDES

    run = split(load_recipe("dit-tiny-digits", [*TINY_OVERRIDES, "blocks.num=2"]), out=in_tmp / "run2")
    steps = ["--steps", "60", "train.checkpoint_every=5", "train.log_every=5"]
    cmd = [sys.executable, "-m", "dbconvert", "train-all", "--parallel", "2", "--run", str(run.root), *steps]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = run.model_dir("block-01") / locks.LOCK_NAME
    deadline = time.monotonic() + 120
    while run.status("block-01").step < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    victim = json.loads(lock.read_text())["pid"]
    os.kill(victim, signal.SIGKILL)  # block 1's own process, mid-way
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out + err
    assert "block 1 failed (killed by SIGKILL" in err and str(run.root / "logs" / "block-01.log") in err
    assert run.status("block-00").step == 60  # the other block went on
    stopped = run.status("block-01").step
    assert 5 <= stopped < 60

    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (
        "every block" in again.stdout and "block 1: started" in again.stdout and "block 0: started" not in again.stdout
    )
    assert run.status("block-01").step == 60
    records = [json.loads(x) for x in run.metrics_path("block-01").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, 61, 5))
