"""train-block / train-e2e: independence, exact resume, metrics, EMA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dbconvert.checkpoint as ckpt
import dbconvert.train as train_mod
from dbconvert.checkpoint import load_weights
from dbconvert.errors import DbconvertError, RunError
from dbconvert.rundir import Run
from dbconvert.train import batch_indices, train_block, train_e2e


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_training_block_2_touches_only_block_2(tiny_run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _snapshot(tiny_run.root)
    loaded: list[Path] = []
    real = ckpt.load_weights

    def spy(path: Path):  # noqa: ANN202
        loaded.append(Path(path))
        return real(path)

    monkeypatch.setattr(train_mod, "load_weights", spy)
    train_block(tiny_run, 2, progress=False)
    block2 = tiny_run.model_dir("block-02")
    assert loaded and all(p.is_relative_to(block2) for p in loaded), loaded
    after = _snapshot(tiny_run.root)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed and all(k.startswith("blocks/block-02/") or k == "metrics/block-02.jsonl" for k in changed), changed
    assert {"blocks/block-02/ema.safetensors", "blocks/block-02/state.safetensors"} <= changed


def test_interrupted_and_resumed_equals_uninterrupted(tiny_run: Run, tmp_path: Path) -> None:
    import shutil

    other = Run.open(shutil.copytree(tiny_run.root, tmp_path / "copy"))
    train_block(tiny_run, 1, steps=6, progress=False)
    train_block(other, 1, steps=2, progress=False)  # "interrupted" after 2 steps (a checkpoint every 2)
    assert other.status("block-01").step == 2
    train_block(other, 1, steps=6, progress=False)
    for name in ("model", "ema"):
        a = load_weights(tiny_run.model_dir("block-01") / f"{name}.safetensors")
        b = load_weights(other.model_dir("block-01") / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    lines = [json.loads(x) for x in tiny_run.metrics_path("block-01").read_text().splitlines()]
    resumed = [json.loads(x) for x in other.metrics_path("block-01").read_text().splitlines()]
    assert [r["step"] for r in lines] == [r["step"] for r in resumed] == [2, 4, 6]
    assert [r["loss"] for r in lines] == pytest.approx([r["loss"] for r in resumed])


def test_dropout_is_deterministic_by_seed_and_resumes_exactly(in_tmp: Path) -> None:
    """Issue 34: with model.dropout > 0 two copies of a run drew different dropout masks (an unseeded global RNG)."""
    import shutil

    from dbconvert.config import load_recipe
    from dbconvert.split import split

    recipe = load_recipe(
        "vit-tiny-digits",
        [
            "model.embed_dim=32",
            "model.depth=2",
            "model.num_heads=2",
            "model.dropout=0.3",
            "blocks.num=2",
            "train.steps=4",
            "train.epochs=null",
            "train.batch_size=16",
            "train.warmup_steps=0",
            "train.log_every=1",
            "train.checkpoint_every=2",
            "train.ema_decay=0.5",
            "train.lr_schedule=constant",
        ],
    )  # stopping at 2 of 2 = interrupted
    run = split(recipe, out=in_tmp / "a")
    copy = Run.open(shutil.copytree(run.root, in_tmp / "b"))
    resumed = Run.open(shutil.copytree(run.root, in_tmp / "c"))
    torch.manual_seed(1)  # what else the process drew before does not matter
    train_block(run, 0, progress=False)
    torch.manual_seed(2)
    train_block(copy, 0, progress=False)
    train_block(resumed, 0, steps=2, progress=False)  # "interrupted" at the checkpoint of step 2
    torch.manual_seed(3)
    train_block(resumed, 0, steps=4, progress=False)
    losses = [
        [json.loads(x)["loss"] for x in r.metrics_path("block-00").read_text().splitlines()]
        for r in (run, copy, resumed)
    ]
    assert len(losses[0]) == 4 and losses[0] == losses[1] == losses[2]
    for other in (copy, resumed):
        for name in ("model", "ema"):
            a = load_weights(run.model_dir("block-00") / f"{name}.safetensors")
            b = load_weights(other.model_dir("block-00") / f"{name}.safetensors")
            assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_steps_global_rng_is_seeded_by_the_step_and_restored_after() -> None:
    from dbconvert.trainstep import seeded_global_rng

    cpu = torch.device("cpu")
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    with seeded_global_rng(torch.Generator().manual_seed(5), 0, cpu):
        first = torch.rand(4)
    assert torch.equal(torch.random.get_rng_state(), before)  # draws outside a step are what they were
    with seeded_global_rng(torch.Generator().manual_seed(5), 0, cpu):
        assert torch.equal(torch.rand(4), first)
    with seeded_global_rng(torch.Generator().manual_seed(5), 1, cpu):  # another data-parallel rank
        assert not torch.equal(torch.rand(4), first)
    with seeded_global_rng(torch.Generator().manual_seed(6), 0, cpu):  # another step
        assert not torch.equal(torch.rand(4), first)
    assert not torch.equal(first, torch.rand(4, generator=torch.Generator().manual_seed(5)))  # not the noise's stream


def test_restart_starts_over_and_finished_block_is_a_noop(tiny_run: Run) -> None:
    train_block(tiny_run, 0, progress=False)
    again = train_block(tiny_run, 0, progress=False)
    assert again.last_loss is None and again.step == 4
    restarted = train_block(tiny_run, 0, restart=True, progress=False)
    assert restarted.last_loss is not None
    assert len(tiny_run.metrics_path("block-00").read_text().splitlines()) == 2


def test_metrics_have_one_json_line_per_logged_step(tiny_run: Run) -> None:
    train_block(tiny_run, 3, progress=False)
    records = [json.loads(x) for x in tiny_run.metrics_path("block-03").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert {"step", "loss", "lr", "sigma_min", "sigma_max", "examples_per_s", "peak_memory_bytes"} <= set(r)
        assert r["threads"] == torch.get_num_threads()  # a CPU run's last bits depend on it: recorded
        lo, hi = tiny_run.block(3).train_range
        assert lo <= r["sigma_min"] <= r["sigma_max"] <= hi * (1 + 1e-6)


def test_ema_follows_the_decay(tiny_run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """The EMA file equals an EMA computed by hand over the model's weights after every step.

    decay 0.2 with the warm-up: steps 0 and 1 use the warm-up decay (0.1, 0.18), steps 2 and 3 the cap (0.2).
    """
    from dbconvert.trainstep import TrainingState, ema_decay_at

    after: list[dict[str, torch.Tensor]] = []
    real_update = TrainingState.update

    def update(self: TrainingState, step: int) -> None:
        real_update(self, step)
        after.append({k: v.detach().clone() for k, v in self.network.state_dict().items()})

    monkeypatch.setattr(TrainingState, "update", update)
    train_block(tiny_run, 0, overrides=["train.ema_decay=0.2"], progress=False)
    decays = [ema_decay_at(0.2, step) for step in range(len(after))]
    assert len(after) == 4 and decays[0] < decays[1] < decays[2] == decays[3] == 0.2
    ema = load_weights(tiny_run.model_dir("block-00") / "init.safetensors")
    for decay, weights in zip(decays, after):
        ema = {k: decay * ema[k] + (1 - decay) * weights[k] for k in ema}
    saved = load_weights(tiny_run.model_dir("block-00") / "ema.safetensors")
    model = load_weights(tiny_run.model_dir("block-00") / "model.safetensors")
    for k in saved:
        torch.testing.assert_close(saved[k], ema[k], rtol=1e-5, atol=1e-6)
    assert not all(torch.allclose(saved[k], model[k]) for k in model)  # a real average, not a copy of the model
    assert all(torch.equal(model[k], after[-1][k]) for k in model)


def test_e2e_trains_the_whole_network(tiny_run: Run) -> None:
    result = train_e2e(tiny_run, steps=2, progress=False)
    weights = load_weights(tiny_run.model_dir("e2e") / "model.safetensors")
    assert result.step == 2 and "blocks.3.attn.qkv.weight" in weights
    assert tiny_run.status("e2e").trained


def test_a_long_run_lowers_the_loss(tiny_run: Run) -> None:
    train_block(tiny_run, 1, overrides=["train.lr=2e-3", "train.log_every=10"], steps=60, progress=False)
    losses = [json.loads(x)["loss"] for x in tiny_run.metrics_path("block-01").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0]


def test_bad_training_requests(tiny_run: Run) -> None:
    with pytest.raises(RunError, match="out of range"):
        train_block(tiny_run, 4, progress=False)
    with pytest.raises(DbconvertError, match="fixed when the run is split"):
        train_block(tiny_run, 0, overrides=["noise.gamma=0.3"], progress=False)
    with pytest.raises(DbconvertError, match="fewer than train.batch_size"):
        train_block(tiny_run, 0, overrides=["train.batch_size=100000"], progress=False)
    with pytest.raises(DbconvertError, match="loss became"):
        train_block(tiny_run, 0, overrides=["train.lr=1e30", "train.steps=50"], progress=False)


def test_batches_cover_each_example_once_per_epoch() -> None:
    seen = torch.cat([batch_indices(0, s, 10, 50) for s in range(5)])
    assert sorted(seen.tolist()) == list(range(50))
    assert not torch.equal(batch_indices(0, 0, 10, 50), batch_indices(0, 5, 10, 50))  # reshuffled next epoch


def test_epochs_override_sets_the_length_in_full_batches(tiny_run: Run) -> None:
    # digits train has 1438 images: 89 full batches of 16 per epoch, so 0.05 epochs = ceil(4.45) = 5 steps
    result = train_block(tiny_run, 0, epochs=0.05, progress=False)
    assert result.step == result.total_steps == 5
    assert tiny_run.status("block-00").total_steps == 5


def test_ema_decay_warms_up_to_the_recipe_value() -> None:
    from dbconvert.trainstep import ema_decay_at

    assert ema_decay_at(0.9999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.9999, 90) == pytest.approx(0.91)
    assert ema_decay_at(0.9999, 10**7) == 0.9999
    assert ema_decay_at(0.995, 10**4) == 0.995
    assert ema_decay_at(0.9999, 0, warmup=False) == 0.9999
