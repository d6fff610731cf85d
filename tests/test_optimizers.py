"""The memory options of training (docs/memory.md, "Memory options"): each trains, is recorded in the run and
resumes exactly; stochastic rounding is unbiased; the optimizer in backward equals the plain step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from dbconvert.checkpoint import load_weights
from dbconvert.config import load_recipe
from dbconvert.errors import DbconvertError
from dbconvert.optimizers import (
    InBackwardOptimizer,
    StochasticAdamW,
    bytes_per_parameter,
    flatten_state,
    single_optimizer,
    stochastic_bf16,
    unflatten_state,
)
from dbconvert.rundir import Run
from dbconvert.train import train_block

from tests.conftest import TINY_OVERRIDES

torchao = pytest.importorskip("torchao", reason="the memory extra (torchao) is not installed")


def recipe_with(*overrides: str):  # noqa: ANN201
    return load_recipe("dit-tiny-digits", [*TINY_OVERRIDES, *overrides]).train


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values() -> None:
    gen = torch.Generator().manual_seed(0)
    exact = torch.randn(1000).bfloat16().float()
    assert torch.equal(stochastic_bf16(exact, gen).float(), exact)  # a bf16 value is never moved
    x = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way from 1 to the next bf16 (1 + 2^-7... step 2^-7)
    r = stochastic_bf16(x, gen).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert r.mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)  # unbiased; round-to-nearest would give 1.0
    assert torch.isinf(stochastic_bf16(torch.tensor([float("inf")]), gen)).all()


def test_stochastic_adamw_follows_torch_adamw_in_float32_and_moves_bf16_weights() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    ours = StochasticAdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1)
    x = torch.randn(4, 8)
    for _ in range(5):
        for net, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    assert torch.allclose(a.weight, b.weight, atol=1e-6)
    # bf16 weights with a tiny learning rate: round-to-nearest loses every update, stochastic rounding does not
    w = nn.Parameter(torch.ones(10_000, dtype=torch.bfloat16))
    opt = StochasticAdamW([w], lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    for _ in range(20):
        w.grad = torch.ones_like(w)
        opt.step()
    assert w.float().mean().item() == pytest.approx(1 - 20 * 1e-4, rel=2e-4)  # Adam: ~lr a step
    plain = nn.Parameter(torch.ones(10, dtype=torch.bfloat16))
    torch_opt = torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0)
    for _ in range(20):
        plain.grad = torch.ones_like(plain)
        torch_opt.step()
    assert torch.equal(plain.float(), torch.ones(10))  # what bf16-true would do without it


def test_optimizer_in_backward_equals_the_step_after_backward() -> None:
    train = recipe_with("train.optimizer_in_backward=true")
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)) for _ in range(2))
    b.load_state_dict(a.state_dict())
    hooked = InBackwardOptimizer(lambda ps: torch.optim.AdamW(ps, lr=1e-2), list(a.parameters()))
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2)
    seen: list[int] = []
    for p in a.parameters():  # no two gradients alive at once: each is freed in its own hook
        p.register_post_accumulate_grad_hook(lambda p: seen.append(sum(q.grad is not None for q in a.parameters())))
    x = torch.randn(3, 6)
    for _ in range(3):
        a(x).sum().backward()
        hooked.step()
        b(x).sum().backward()
        plain.step()
        plain.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert max(seen) <= 1
    state = hooked.state_dict()
    again = InBackwardOptimizer(lambda ps: torch.optim.AdamW(ps, lr=1e-2), list(a.parameters()))
    again.load_state_dict(state)
    first = next(a.parameters())
    assert torch.equal(again.inner[0].state[first]["exp_avg"], hooked.inner[0].state[first]["exp_avg"])
    assert train.optimizer_in_backward


def test_eight_bit_state_round_trips_bit_exact_through_flat_tensors() -> None:
    train = recipe_with("train.optimizer=adamw8bit")
    torch.manual_seed(0)
    net = nn.Linear(64, 64)
    opt = single_optimizer(train, list(net.parameters()), torch.device("cpu"))
    net(torch.randn(2, 64)).sum().backward()
    opt.step()
    tensors, meta = flatten_state(opt)
    assert all(type(t) is torch.Tensor for t in tensors.values())  # plain tensors: safetensors can hold them
    assert any(t.dtype == torch.uint8 for t in tensors.values())  # the 8-bit codes themselves
    other = single_optimizer(train, list(net.parameters()), torch.device("cpu"))
    other.load_state_dict(unflatten_state(tensors, meta))
    for p in net.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(other.state[p][key].dequantize(), opt.state[p][key].dequantize())


def test_bytes_per_parameter_of_each_option() -> None:
    assert sum(bytes_per_parameter(recipe_with()).values()) == 20  # fp32 weights 4, grads 4, 2 moments 8, EMA 4
    true = bytes_per_parameter(recipe_with("train.precision=bf16-true", "train.ema=off"))
    assert true == {"parameters": 2, "gradients": 2, "optimizer_state": 4, "ema": 0, "ema_host": 0}
    eight = bytes_per_parameter(recipe_with("train.optimizer=adamw8bit", "train.ema=cpu"))
    assert eight["optimizer_state"] == pytest.approx(2.03125) and eight["ema"] == 0 and eight["ema_host"] == 4
    assert bytes_per_parameter(recipe_with("train.optimizer_in_backward=true"), 0.1)["gradients"] == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.optimizer_in_backward=true", "train.grad_clip=1.0"], "cannot clip"),
        (["train.optimizer_in_backward=true", "train.grad_accumulation=2"], "cannot accumulate"),
        (["train.optimizer_in_backward=true", "train.precision=fp16"], "loss scaler"),
        (["train.grad_accumulation=3"], "does not divide"),
        (["train.ema=gpu"], "train.ema"),
        (["train.optimizer=adamw4bit"], "train.optimizer"),
    ],
)
def test_bad_option_combinations_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(DbconvertError) as err:
        recipe_with(*overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


OPTIONS = {
    "bf16-true": ["train.precision=bf16-true"],
    "adamw8bit": ["train.optimizer=adamw8bit"],
    "ema-off": ["train.ema=off"],
    "ema-cpu": ["train.ema=cpu"],
    "in-backward": ["train.optimizer_in_backward=true"],
    "accumulation": ["train.grad_accumulation=4"],
    "all": [
        "train.precision=bf16-true",
        "train.optimizer=adamw8bit",
        "train.ema=off",
        "train.optimizer_in_backward=true",
    ],
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_trains_records_itself_and_resumes_exactly(tiny_run: Run, tmp_path: Path, name: str) -> None:
    overrides = OPTIONS[name]
    other = Run.open(shutil.copytree(tiny_run.root, tmp_path / "copy"))
    train_block(tiny_run, 1, steps=4, overrides=overrides, progress=False)
    train_block(other, 1, steps=2, overrides=overrides, progress=False)  # "interrupted" at the step-2 checkpoint
    train_block(other, 1, steps=4, overrides=overrides, progress=False)
    files = ("model", "ema") if "train.ema=off" not in overrides else ("model",)
    for file in files:
        a = load_weights(tiny_run.model_dir("block-01") / f"{file}.safetensors")
        b = load_weights(other.model_dir("block-01") / f"{file}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), file
    state = json.loads((tiny_run.model_dir("block-01") / "state.json").read_text())
    options = state["memory_options"]
    assert options["precision"] == ("bf16-true" if "train.precision=bf16-true" in overrides else "fp32")
    ema = "off" if "train.ema=off" in overrides else "cpu" if "train.ema=cpu" in overrides else "device"
    assert options["ema"] == ema
    assert state["weights_dtype"] == ("bfloat16" if options["precision"] == "bf16-true" else "float32")
    assert (tiny_run.model_dir("block-01") / "ema.safetensors").exists() == (options["ema"] != "off")
    first = json.loads(tiny_run.metrics_path("block-01").read_text().splitlines()[0])
    assert first["effective_batch"] == 16 and first["micro_batch"] == (4 if name == "accumulation" else 16)
    trained = load_weights(tiny_run.model_dir("block-01") / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in trained.values())
    init = load_weights(tiny_run.model_dir("block-01") / "init.safetensors")
    assert any(not torch.equal(trained[k].float(), init[k].float()) for k in trained)  # it learned something


def test_accumulation_matches_the_whole_batch_gradient(tiny_run: Run, tmp_path: Path) -> None:
    """SGD without momentum: one step of 4 accumulated micro-batches = a step on their mean gradient; the weights
    differ from the whole batch's step only by the noise drawn per micro-batch, so compare with lr small: equal
    learning signal scale (loss / N), not N times larger."""
    other = Run.open(shutil.copytree(tiny_run.root, tmp_path / "copy"))
    base = ["train.optimizer=sgd", "train.betas=[0.0,0.999]", "train.lr=0.5"]
    train_block(tiny_run, 0, steps=1, overrides=base, progress=False)
    train_block(other, 0, steps=1, overrides=[*base, "train.grad_accumulation=4"], progress=False)
    init = load_weights(tiny_run.model_dir("block-00") / "init.safetensors")
    whole = load_weights(tiny_run.model_dir("block-00") / "model.safetensors")
    accum = load_weights(other.model_dir("block-00") / "model.safetensors")
    step_whole = torch.cat([(whole[k] - init[k]).flatten() for k in init])
    step_accum = torch.cat([(accum[k] - init[k]).flatten() for k in init])
    ratio = step_accum.norm() / step_whole.norm()
    assert 0.5 < ratio < 2.0  # the same scale: a sum of N micro-gradients would be ~4x
    assert torch.nn.functional.cosine_similarity(step_whole, step_accum, dim=0) > 0.5


def test_a_resume_with_other_memory_options_is_refused(tiny_run: Run) -> None:
    train_block(tiny_run, 0, steps=2, progress=False)
    with pytest.raises(DbconvertError) as err:
        train_block(tiny_run, 0, steps=4, overrides=["train.precision=bf16-true"], progress=False)
    assert "train.precision=fp32" in str(err.value) and "--restart" in str(err.value)


def test_sampling_a_run_trained_without_ema_uses_the_model_weights_and_says_so(
    tiny_run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(4):
        train_block(tiny_run, i, steps=1, overrides=["train.ema=off"], progress=False)
    assert tiny_run.weights_file("block-00", "ema").name == "model.safetensors"
    assert "train.ema=off" in capsys.readouterr().err
    assert tiny_run.weights_file("block-00", "model").name == "model.safetensors"


LEAN = [
    "train.precision=bf16-true",
    "train.optimizer=adamw8bit",
    "train.ema=off",
    "train.optimizer_in_backward=true",
    "train.grad_clip=null",
]


@pytest.mark.parametrize("family", ["llama", "vit"])
def test_the_leanest_options_train_and_sample_every_family(in_tmp: Path, family: str) -> None:
    """bf16 weights, 8-bit moments, no EMA and the optimizer in backward through a text and a classifier family
    (DiT: the resume test above): the loss is finite and generation reads the model weights."""
    from dbconvert.split import split
    from tests.families.llama_tiny import tiny_overrides, write_corpus
    from tests.families.test_vit import TINY

    if family == "llama":
        recipe = load_recipe("llama-tiny-shakespeare", tiny_overrides(write_corpus(in_tmp)))
    else:
        recipe = load_recipe("vit-tiny-digits", TINY)
    run = split(recipe, out=in_tmp / "run")
    for i in range(run.recipe.blocks.num):
        result = train_block(run, i, steps=2, overrides=LEAN, progress=False)
        assert result.last_loss is not None and result.last_loss == result.last_loss  # finite, logged
    assert all(
        run.weights_file(f"block-{i:02d}", "ema").name == "model.safetensors" for i in range(run.recipe.blocks.num)
    )
    from dbconvert.sampling import load_model

    net = load_model(
        run, "block-00", run.block(0).layers[1] - run.block(0).layers[0], "blocks", "ema", torch.device("cpu")
    )
    assert all(p.dtype == torch.float32 for p in net.parameters())  # sampling widens the bf16 weights


def test_train_block_shows_the_memory_options_and_the_effective_batch(tiny_run: Run) -> None:
    from tests.cli_helpers import invoke

    result = invoke(
        "train-block", "0", "--steps", "1", "train.grad_accumulation=4", "train.ema=cpu", "--run", tiny_run.root
    )
    assert result.exit_code == 0, result.output
    assert "memory options: fp32 adamw ema-cpu accum4; effective batch 16 = 4 x 4" in result.stdout
