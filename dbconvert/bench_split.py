"""`dbconvert bench split`: split a checkpoint of a real model's size on this machine, and say what it cost.

A random checkpoint of the recipe's architecture (the shipped `*-shape` recipes name real models: TinyLlama-1.1B,
Llama-2-7B, ...) is written tensor by tensor in the given dtype, then split in a fresh process (wall time, peak
resident memory, run size on disk), then one block trains one step in a fresh process (peak resident memory),
unless the static bytes of that block's training (`bench memory --static`) already exceed the memory available:
then the static figure is reported and said to be one. Everything is written into one scratch folder (on the
disk of `--dir`) and removed afterwards unless `keep` is set. This is a benchmark, never a test: at real sizes it
takes minutes and gigabytes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from dbconvert.checkpoint import STORAGE_DTYPES
from dbconvert.config import Recipe, apply_overrides, validate_recipe
from dbconvert.errors import DbconvertError
from dbconvert.families import get_family

MEMORY_MARGIN = 0.85
"""A training step is run only when its static bytes fit in this share of the memory available now."""


def folder_bytes(path: Path) -> int:
    """Bytes on disk of the files under `path` (hard links counted once)."""
    seen, total = set(), 0
    for root, _, files in os.walk(path):
        for name in files:
            stat = os.lstat(os.path.join(root, name))
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_blocks * 512
    return total


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measured_process(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python -m dbconvert ARGS` in a fresh process: exit code, wall seconds, its own peak RSS (the
    ru_maxrss that wait4 reports for that child alone) and its last line of output."""
    with tempfile.TemporaryFile(mode="w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "dbconvert", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        lines = log.read().strip().splitlines()
    return {
        "returncode": proc.returncode,
        "seconds": seconds,
        "peak_rss_bytes": int(usage.ru_maxrss * 1024),
        "output": lines[-1:],
    }


def bench_split(
    recipe: Recipe,
    blocks: int,
    dtype: str = "bfloat16",
    train: bool = True,
    batch: int = 1,
    context: int | None = None,
    directory: Path | None = None,
    keep: bool = False,
    seed: int = 0,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write a random `dtype` checkpoint of `recipe`'s architecture, split it into `blocks`, train one step of the
    deepest block (see the module docstring); returns the figures."""
    from dbconvert.bench import bench_static, with_blocks

    if dtype not in STORAGE_DTYPES:
        raise DbconvertError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, not {dtype!r}")
    if batch < 1:
        raise DbconvertError(f"--batch must be at least 1, got {batch}")
    say = on_progress or (lambda msg: None)
    family = get_family(recipe.model.family)
    if not family.writes_random_checkpoints:
        raise DbconvertError(
            f"the {family.name} family cannot write a random checkpoint, so `bench split` does not apply to it"
        )
    extra = [f"model.context={context}"] if context else []
    recipe = overridden(with_blocks(recipe, blocks), extra)
    from dbconvert.split import layer_ranges, source_depth

    ranges = layer_ranges(source_depth(recipe), blocks, recipe.blocks.uneven)  # a bad B is one line, before any work
    base = Path(directory) if directory is not None else Path.cwd()
    base.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".dbconvert-bench-split-", dir=base))
    out: dict[str, Any] = {
        "recipe": recipe.name,
        "blocks": blocks,
        "dtype": dtype,
        "folder": str(scratch),
        "machine": {"cpus": os.cpu_count(), "memory_bytes": _total_memory()},
    }
    try:
        say(f"writing a random {dtype} checkpoint of {recipe.name} into {scratch}")
        t0 = time.perf_counter()
        overrides = family.random_checkpoint(recipe, scratch / "checkpoint", STORAGE_DTYPES[dtype], seed)
        out["checkpoint_bytes"] = folder_bytes(scratch / "checkpoint")
        out["checkpoint_write_seconds"] = time.perf_counter() - t0
        recipe_file = scratch / "recipe.yaml"
        recipe_file.write_text(yaml.safe_dump(overridden(recipe, overrides).to_dict(), sort_keys=False))
        say(f"splitting it into {blocks} blocks in a fresh process")
        split = measured_process(["split", str(recipe_file), "--out", str(scratch / "run"), "--quiet"])
        if split["returncode"] != 0:
            raise DbconvertError(f"the split failed (exit {split['returncode']}): {' '.join(split['output'])}")
        out["split"] = {
            "seconds": split["seconds"],
            "peak_rss_bytes": split["peak_rss_bytes"],
            "run_bytes": folder_bytes(scratch / "run"),
        }
        deepest = max(range(blocks), key=lambda i: ranges[i][1] - ranges[i][0])
        static = bench_static(
            overridden(recipe, [*overrides, f"train.batch_size={batch}"]),
            blocks,
            checkpointing=False,
            every_block=False,
        )
        block_static = max(static["block_static_bytes"])
        largest_block = max(_block_file_bytes(scratch / "run"), default=0)  # before training replaces any
        out["largest_block_file_bytes"] = largest_block
        out["train"] = {"block": deepest, "batch": batch, "static_bytes": block_static}
        available = available_bytes()
        if not train:
            out["train"]["measured"] = False
            out["train"]["why"] = "--no-train"
        elif available is not None and block_static > MEMORY_MARGIN * available:
            out["train"]["measured"] = False
            out["train"]["why"] = (
                f"its static part alone ({block_static / 2**30:.1f} GiB) exceeds "
                f"{MEMORY_MARGIN:.0%} of the {available / 2**30:.1f} GiB available"
            )
        else:
            say(f"training block {deepest} for one step (batch {batch}) in a fresh process")
            step = measured_process(
                [
                    "train-block",
                    str(deepest),
                    "--run",
                    str(scratch / "run"),
                    "--steps",
                    "1",
                    f"train.batch_size={batch}",
                    "train.val_every=0",
                    "train.device=cpu",
                ]
            )
            if step["returncode"] != 0:
                raise DbconvertError(
                    f"the training step failed (exit {step['returncode']}): {' '.join(step['output'])}"
                )
            out["train"].update(measured=True, seconds=step["seconds"], peak_rss_bytes=step["peak_rss_bytes"])
        return out
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)


def overridden(recipe: Recipe, overrides: list[str]) -> Recipe:
    """`recipe` with `key.sub=value` overrides in any section (validated again)."""
    return validate_recipe(apply_overrides(recipe.to_dict(), overrides), f"recipe {recipe.name}")


def _block_file_bytes(run: Path) -> list[int]:
    return [p.stat().st_size for p in (run / "blocks").glob("*/model.safetensors")]


def _total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def split_report(r: dict[str, Any]) -> list[Any]:
    """The `bench split` table and its lines."""
    from rich.table import Table

    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    table = Table(title=f"split of a random {r['dtype']} checkpoint ({r['recipe']}, B={r['blocks']})")
    for col in (
        "checkpoint GiB",
        "split s",
        "split peak RSS GiB",
        "x checkpoint",
        "largest block GiB",
        "run on disk GiB",
        "train step peak RSS GiB",
    ):
        table.add_column(col, justify="right")
    s, t = r["split"], r["train"]
    step = gib(t["peak_rss_bytes"]) if t.get("measured") else f"{gib(t['static_bytes'])} (static)"
    table.add_row(
        gib(r["checkpoint_bytes"]),
        f"{s['seconds']:.0f}",
        gib(s["peak_rss_bytes"]),
        f"{s['peak_rss_bytes'] / max(r['checkpoint_bytes'], 1):.2f}",
        gib(r["largest_block_file_bytes"]),
        gib(s["run_bytes"]),
        step,
    )
    lines: list[Any] = [table]
    if not t.get("measured"):
        lines.append(
            f"block {t['block']} was not trained: {t['why']}; its static training bytes (parameters, "
            "gradients, optimizer state, EMA; no activations) are shown"
        )
    else:
        lines.append(
            f"the training step is block {t['block']} (the deepest), batch {t['batch']}, on the CPU, in "
            f"{t['seconds']:.0f} s including start-up"
        )
    mem = r["machine"]["memory_bytes"]
    lines.append(
        f"machine: {r['machine']['cpus']} CPUs, {gib(mem) if mem else '?'} GiB; peak RSS is the fresh "
        "process's ru_maxrss (Python, torch and the libraries it loads included)"
    )
    return lines
