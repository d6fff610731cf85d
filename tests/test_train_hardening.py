"""Training survives what real runs meet: a kill in the final checkpoint, a kill right after --restart,
loss scaling across a resume, and held-out text rows that a training seed cannot move.

Kills are simulated in-process by raising from inside `train` at the exact moment (a SIGKILL version
of the final-checkpoint case is in tests/test_crash_safety.py).
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import dbconvert.train as train_mod
import dbconvert.trainstep as trainstep
from dbconvert.checkpoint import load_weights
from dbconvert.rundir import Run
from dbconvert.train import train_block, training_recipe
from dbconvert.trainstep import TrainingState

from tests.families.llama_tiny import tiny_overrides, write_corpus


class Killed(Exception):
    """Stands for the process dying at this point."""


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as fh:
        return fh.metadata() or {}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_during_the_final_checkpoint_is_repaired_on_rerun(
    tiny_run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the final state file, before model/ema/state.json: the rerun trains nothing and re-exports."""
    out = tiny_run.model_dir("block-01")
    real = train_mod.save_weights

    def dies_exporting_the_last_step(path: Path, state, metadata=None) -> None:  # noqa: ANN001
        if Path(path).name == "model.safetensors" and (metadata or {}).get("step") == "4":
            raise Killed
        real(path, state, metadata=metadata)

    monkeypatch.setattr(train_mod, "save_weights", dies_exporting_the_last_step)
    with pytest.raises(Killed):
        train_block(tiny_run, 1, progress=False)
    monkeypatch.undo()
    assert metadata(out / "state.safetensors")["step"] == "4"  # the state file is final ...
    assert (
        metadata(out / "model.safetensors")["step"] == "2" and tiny_run.status("block-01").step == 2
    )  # ... the exports not

    again = train_block(tiny_run, 1, progress=False)
    assert again.step == 4 and again.last_loss is None  # nothing trained twice
    state = load_weights(out / "state.safetensors")
    for name in ("model", "ema"):
        assert metadata(out / f"{name}.safetensors")["step"] == "4"
        exported = load_weights(out / f"{name}.safetensors")
        assert same(exported, {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")})
    assert json.loads((out / "state.json").read_text())["step"] == 4
    assert tiny_run.status("block-01").finished


def test_restart_clears_the_old_run_at_once_and_starts_from_the_split_weights(
    tiny_run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = Run.open(shutil.copytree(tiny_run.root, tmp_path / "fresh"))  # the run as split, never trained
    out = tiny_run.model_dir("block-00")
    split_weights = load_weights(fresh.model_dir("block-00") / "model.safetensors")
    train_block(tiny_run, 0, progress=False)
    assert not same(load_weights(out / "model.safetensors"), split_weights)
    assert same(load_weights(out / "init.safetensors"), split_weights)  # split's copy survives training

    first: list[dict[str, torch.Tensor]] = []
    real_loss = TrainingState.loss

    def killed_in_the_first_step(self: TrainingState, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        first.append({k: v.detach().clone() for k, v in self.network.state_dict().items()})
        raise Killed

    monkeypatch.setattr(TrainingState, "loss", killed_in_the_first_step)
    with pytest.raises(Killed):
        train_block(tiny_run, 0, restart=True, progress=False)
    assert same(first[0], split_weights)  # --restart trains from the split weights, not the trained ones
    assert not (out / "state.safetensors").exists() and tiny_run.status("block-00").step == 0  # the old run is gone

    def watched(self: TrainingState, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        first.append({k: v.detach().clone() for k, v in self.network.state_dict().items()})
        monkeypatch.setattr(TrainingState, "loss", real_loss)
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(TrainingState, "loss", watched)
    result = train_block(tiny_run, 0, progress=False)  # no --restart: must not resume the old run either
    assert result.last_loss is not None and same(first[1], split_weights)
    train_block(fresh, 0, progress=False)
    for name in ("model", "ema"):  # the restarted run is exactly a run trained once from the split
        assert same(
            load_weights(out / f"{name}.safetensors"), load_weights(fresh.model_dir("block-00") / f"{name}.safetensors")
        )
    assert [json.loads(x)["step"] for x in tiny_run.metrics_path("block-00").read_text().splitlines()] == [2, 4]


def test_the_grad_scaler_state_is_checkpointed_and_restored(tiny_run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 loss scaling is CUDA-only, so a CPU GradScaler stands in: its scale doubles every finite step."""

    def scaled(precision: str, device: torch.device):  # noqa: ANN202
        return nullcontext, torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)

    monkeypatch.setattr(trainstep, "precision_context", scaled)
    out = tiny_run.model_dir("block-02")
    train_block(tiny_run, 2, steps=2, progress=False)
    assert json.loads(metadata(out / "state.safetensors")["grad_scaler"])["scale"] == 2.0**12
    train_block(tiny_run, 2, steps=4, progress=False)  # resumes with a new scaler at 2**10, restored to 2**12
    assert json.loads(metadata(out / "state.safetensors")["grad_scaler"])["scale"] == 2.0**14


def test_text_validation_rows_do_not_depend_on_the_training_seed(in_tmp: Path) -> None:
    from dbconvert.config import load_recipe
    from dbconvert.split import split

    run = split(load_recipe("llama-tiny-shakespeare", tiny_overrides(write_corpus(in_tmp))), out=in_tmp / "run")
    family = run.family()

    def rows(*overrides: str, split: str = "val") -> torch.Tensor:
        return family.load_data(training_recipe(run, list(overrides)), split).tokens

    val = rows("train.seed=0")
    assert len(val) >= 2
    assert torch.equal(rows("train.seed=1"), val) and torch.equal(rows("train.seed=12345"), val)
    assert torch.equal(rows("train.seed=1", split="train"), rows("train.seed=0", split="train"))
    moved = run.recipe.model_copy(update={"data": run.recipe.data.model_copy(update={"split_seed": 1})})
    assert not torch.equal(family.load_data(moved, "val").tokens, val)  # the data's own seed does move them


def test_data_settings_are_fixed_at_split_and_refused_at_training_time(tiny_run) -> None:  # noqa: ANN001
    from tests.cli_helpers import assert_user_error, invoke

    for override in ("data.test_fraction=0", "data.source=other.npz", "data.split_seed=3"):
        result = invoke("train-block", "0", override, "--run", tiny_run.root, "--steps", "1", "-q")
        assert_user_error(result, "the 'data' section is fixed when the run is split")
    assert not (tiny_run.root / "blocks" / "block-00" / "state.json").exists()
