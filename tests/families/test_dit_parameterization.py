"""DiT parameterisations: a DDPM epsilon-predictor checkpoint converts into the same function as an EDM denoiser.

The reference is `tests/ddpm_reference.py`, written from the DDPM formulas, not from dbconvert's wrapper.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dbconvert import noise as nz
from dbconvert.config import load_recipe
from dbconvert.errors import CheckpointError, RecipeError
from dbconvert.families import get_family
from dbconvert.families.dit.config import DDPMSchedule
from dbconvert.families.dit.model import DiT, DiTShape
from dbconvert.families.dit.objective import DDPMEpsDenoiser, EDMDenoiser, ddpm_sigmas, ddpm_timestep
from tests.cli_helpers import assert_user_error, invoke
from tests.ddpm_reference import alphas_cumprod, x0_prediction


def reference_checkpoint(path: Path, learn_sigma: bool = True, std: float = 0.05) -> DiT:
    """A DiT-Micro/2 for 8x8 grey digits with every tensor random (the zero-inits would hide mistakes)."""
    torch.manual_seed(3)
    net = DiT(DiTShape(8, 1, 10, 4, 32, 2, 2, learn_sigma=learn_sigma))
    for name, p in net.named_parameters():
        if name != "pos_embed":
            p.data.normal_(std=std)
    torch.save(net.state_dict(), path)
    return net.eval()


def recipe_for(checkpoint: Path | None, *extra: str, learn_sigma: bool = True):  # noqa: ANN201
    return load_recipe(
        "dit-tiny-digits",
        [
            "model.arch=DiT-Micro/2",
            f"model.learn_sigma={str(learn_sigma).lower()}",
            "blocks.num=2",
            f"model.checkpoint={checkpoint}" if checkpoint else "model.checkpoint=null",
            *extra,
        ],
    )


def test_converted_denoiser_equals_the_ddpm_x0_prediction_at_every_integer_step(tmp_path: Path) -> None:
    ref = reference_checkpoint(tmp_path / "ref.pt")
    recipe = recipe_for(tmp_path / "ref.pt")
    family = get_family("dit")
    source = family.source(recipe)
    assert recipe.model.parameterization == "ddpm-eps"  # auto -> ddpm-eps for a checkpoint
    den = family.denoiser(recipe, source.network, recipe.noise.settings()).eval()
    assert isinstance(den, DDPMEpsDenoiser)
    abar = alphas_cumprod()
    gen = torch.Generator().manual_seed(0)
    steps = torch.tensor([0, 1, 17, 250, 500, 731, 998, 999])
    x0 = torch.rand((len(steps), 1, 8, 8), generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 3, 10, 7, 1, 10, 9, 2])  # 10 = the null class
    a = abar[steps].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # the DDPM forward process, straight from the formula
    sigma = ((1 - abar[steps]) / abar[steps]).sqrt()  # the same noise, on the VE scale
    z = x0 + sigma.reshape(-1, 1, 1, 1) * eps
    with torch.no_grad():
        want = x0_prediction(ref, x_t, steps, y, abar)
        got = den(z.float(), sigma.float(), y).double()
    scale = 1 + sigma.reshape(-1, 1, 1, 1)  # |D| grows like sigma * |eps_hat| at the top of the schedule
    err = ((got - want).abs() / scale).amax(dim=(1, 2, 3))
    assert err.max().item() < 1e-5, dict(zip(steps.tolist(), err.tolist()))
    # the old mapping (EDM preconditioning of an epsilon network) is a different function
    edm = EDMDenoiser(source.network, recipe.noise.settings())
    with torch.no_grad():
        assert (edm(z.float(), sigma.float(), y).double() - want).abs().max() > 0.1


def test_timestep_is_linear_in_log_sigma_between_steps_and_clamped_outside() -> None:
    sigmas = ddpm_sigmas(DDPMSchedule())
    assert sigmas[0].item() == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)))
    log_sigmas = sigmas.log()
    k, w = 400, 0.3
    between = torch.exp((1 - w) * log_sigmas[k] + w * log_sigmas[k + 1])
    t = ddpm_timestep(
        torch.stack([sigmas[0], sigmas[k], between, sigmas[-1], sigmas[0] / 5, sigmas[-1] * 5]), log_sigmas
    )
    assert t.tolist() == pytest.approx([0.0, k, k + w, 999.0, 0.0, 999.0], abs=1e-9)


def test_auto_is_ddpm_eps_for_a_checkpoint_and_edm_for_a_fresh_network(tmp_path: Path) -> None:
    reference_checkpoint(tmp_path / "ref.pt")
    family = get_family("dit")
    fresh = recipe_for(None)
    family.source(fresh)
    assert fresh.model.parameterization == "edm" and family.parameterization(fresh) == {"name": "edm"}
    assert isinstance(family.denoiser(fresh, DiT(fresh.model.shape()), fresh.noise.settings()), EDMDenoiser)
    forced = recipe_for(tmp_path / "ref.pt", "model.parameterization=edm")
    family.source(forced)
    assert forced.model.parameterization == "edm"  # an explicit choice wins over auto
    record = family.parameterization(recipe_for(None, "model.parameterization=ddpm-eps"))
    assert record["name"] == "ddpm-eps" and record["timesteps"] == 1000 and record["beta_end"] == 0.02
    assert record["sigma_range"] == pytest.approx([0.0100005, 157.4073], rel=1e-5)


def test_exported_metadata_decides_auto_and_a_contradiction_is_an_error(tmp_path: Path) -> None:
    net = reference_checkpoint(tmp_path / "ref.pt", learn_sigma=False)
    path = tmp_path / "export.safetensors"
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata={"dbconvert": json.dumps({"parameterization": {"name": "edm"}})})
    family = get_family("dit")
    recipe = recipe_for(path, learn_sigma=False)
    family.source(recipe)
    assert recipe.model.parameterization == "edm"
    with pytest.raises(CheckpointError, match="holds a 'edm' network .* set model.parameterization=edm or auto"):
        family.source(recipe_for(path, "model.parameterization=ddpm-eps", learn_sigma=False))
    record = {"name": "ddpm-eps", "beta_start": 1e-4, "beta_end": 0.025, "timesteps": 1000}
    save_file(state, str(path), metadata={"dbconvert": json.dumps({"parameterization": record})})
    with pytest.raises(
        CheckpointError, match="beta_end=0.025 .* set model.ddpm.beta_start=0.0001 model.ddpm.beta_end=0.025"
    ):
        family.source(recipe_for(path, learn_sigma=False))
    family.source(recipe_for(path, "model.ddpm.beta_end=0.025", learn_sigma=False))  # the matching schedule is fine


def test_noise_range_outside_the_schedule(tmp_path: Path) -> None:
    reference_checkpoint(tmp_path / "ref.pt")
    family = get_family("dit")
    with pytest.raises(RecipeError, match=r"noise.sigma_max=200 lies above .* set noise.sigma_max <= 157.4"):
        family.source(recipe_for(tmp_path / "ref.pt", "noise.sigma_max=200"))
    source = family.source(recipe_for(tmp_path / "ref.pt"))  # the recipe's sigma_min 0.002 < sigma_0 = 0.01
    assumed = "does not say what its network predicts, so it is taken as a DDPM epsilon-predictor"
    assert len(source.notes) == 2 and assumed in source.notes[0] and "fed t = 0" in source.notes[1]
    assert [assumed in n for n in family.source(recipe_for(tmp_path / "ref.pt", "noise.sigma_min=0.02")).notes] == [
        True
    ]


def test_unknown_parameterization_is_a_one_line_error(in_tmp: Path) -> None:
    result = invoke("split", "dit-tiny-digits", "model.arch=DiT-Micro/2", "model.parameterization=eps")
    assert_user_error(result, "key 'model.parameterization': Input should be 'auto', 'edm' or 'ddpm-eps' (got 'eps')")


def test_the_run_records_and_info_shows_the_parameterization(in_tmp: Path) -> None:
    reference_checkpoint(in_tmp / "ref.pt")
    result = invoke(
        "split",
        "dit-tiny-digits",
        "model.arch=DiT-Micro/2",
        "model.learn_sigma=true",
        f"model.checkpoint={in_tmp / 'ref.pt'}",
        "--blocks",
        "2",
        "--out",
        "run",
    )
    assert result.exit_code == 0, result.output
    assert "note: noise.sigma_min=0.002 lies below" in result.stderr
    info = invoke("info", "--run", "run")
    assert info.exit_code == 0, info.output
    assert (
        "parameterization: ddpm-eps (beta_start=0.0001, beta_end=0.02, timesteps=1000, sigma_range=0.01..157.4)"
        in info.stdout
    )
    from dbconvert.rundir import Run
    from dbconvert.sampling import load_models

    run = Run.open(in_tmp / "run")
    assert run.manifest["parameterization"]["name"] == "ddpm-eps" and run.recipe.model.parameterization == "ddpm-eps"
    family = run.family()
    for name, depth in run.model_targets("blocks"):  # blocks keep the source's parameterisation
        assert isinstance(
            family.denoiser(run.recipe, family.block_network(run.recipe, depth), run.noise()), DDPMEpsDenoiser
        )
    (source,) = load_models(run, "source", "ema", torch.device("cpu"))
    assert isinstance(source, DDPMEpsDenoiser)
    fresh = invoke("split", "dit-tiny-digits", "model.arch=DiT-Micro/2", "--out", "fresh")
    assert fresh.exit_code == 0 and "parameterization: edm" in fresh.stdout
    assert "parameterization: edm" in invoke("info", "--run", "fresh").stdout


def test_sigma_data_does_not_enter_the_ddpm_eps_wrapper() -> None:
    torch.manual_seed(0)
    net = DiT(DiTShape(8, 1, 10, 2, 32, 2, 2))
    for p in net.parameters():
        p.data.normal_(std=0.1)
    z, sigma, y = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 5.0]), torch.tensor([1, 2])
    a = DDPMEpsDenoiser(net, nz.NoiseSettings(sigma_data=0.5), DDPMSchedule())
    b = DDPMEpsDenoiser(net, nz.NoiseSettings(sigma_data=1.0), DDPMSchedule())
    with torch.no_grad():
        assert torch.equal(a(z, sigma, y), b(z, sigma, y))
        assert torch.allclose(a(z, torch.full((2,), 1e-6), y), z, atol=1e-5)  # D -> z as sigma -> 0
