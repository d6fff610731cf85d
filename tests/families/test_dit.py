"""DiT: reference names and shapes, strict checkpoint loading, learn_sigma conversion, exact blocks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dbconvert import noise as nz
from dbconvert.checkpoint import read_checkpoint
from dbconvert.config import load_recipe
from dbconvert.errors import CheckpointError
from dbconvert.families import get_family
from dbconvert.families.dit.convert import block_key_map
from dbconvert.source_ref import checkpoint_digest
from dbconvert.families.dit.objective import EDMDenoiser, sigma_to_timestep
from dbconvert.families.dit.model import DiT, DiTShape, variance_channel_mask

XL2 = DiTShape(
    input_size=32,
    in_channels=4,
    num_classes=1000,
    depth=28,
    hidden_size=1152,
    num_heads=16,
    patch_size=2,
    learn_sigma=True,
)

# Names and shapes of the public DiT-XL/2 256x256 checkpoint (facebookresearch/DiT).
REFERENCE_SHAPES = {
    "pos_embed": (1, 256, 1152),
    "x_embedder.proj.weight": (1152, 4, 2, 2),
    "x_embedder.proj.bias": (1152,),
    "t_embedder.mlp.0.weight": (1152, 256),
    "t_embedder.mlp.2.weight": (1152, 1152),
    "y_embedder.embedding_table.weight": (1001, 1152),
    "blocks.0.attn.qkv.weight": (3456, 1152),
    "blocks.0.attn.proj.weight": (1152, 1152),
    "blocks.0.mlp.fc1.weight": (4608, 1152),
    "blocks.0.mlp.fc2.weight": (1152, 4608),
    "blocks.27.adaLN_modulation.1.weight": (6912, 1152),
    "blocks.27.adaLN_modulation.1.bias": (6912,),
    "final_layer.adaLN_modulation.1.weight": (2304, 1152),
    "final_layer.linear.weight": (32, 1152),
    "final_layer.linear.bias": (32,),
}


def test_dit_xl2_on_meta_matches_the_reference_names_and_shapes() -> None:
    with torch.device("meta"):
        model = DiT(XL2)
    state = model.state_dict()
    assert len(state) == 12 + 28 * 10
    for key, shape in REFERENCE_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(p.numel() for p in model.parameters()) == 675_129_632  # as printed by the reference train.py
    assert not model.pos_embed.requires_grad


def test_adaln_and_final_layer_are_zero_initialised() -> None:
    torch.manual_seed(0)
    model = DiT(DiTShape(8, 1, 10, 2, 32, 2, 2))
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 500.0]), torch.tensor([0, 10]))
    assert out.shape == (2, 1, 8, 8) and torch.count_nonzero(out) == 0


def _tiny_reference(tmp_path: Path, learn_sigma: bool, wrap: str | None, fmt: str) -> tuple[Path, DiT]:
    torch.manual_seed(1)
    net = DiT(DiTShape(8, 1, 10, 4, 32, 2, 2, learn_sigma=learn_sigma))
    for p in net.parameters():  # make every tensor distinctive (the zero-inits would hide mistakes)
        p.data.normal_()
    state = net.state_dict()
    path = tmp_path / f"ref.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({wrap: state, "args": {"note": 1}} if wrap else state, path)
    return path, net


def _recipe(path: Path | None, learn_sigma: bool = False, blocks: int = 2):  # noqa: ANN202
    return load_recipe(
        "dit-tiny-digits",
        [
            "model.arch=DiT-Micro/2",
            f"model.learn_sigma={str(learn_sigma).lower()}",
            f"blocks.num={blocks}",
            f"model.checkpoint={path}" if path else "model.checkpoint=null",
        ],
    )


@pytest.mark.parametrize("fmt,wrap", [("pt", None), ("pt", "ema"), ("pt", "model"), ("safetensors", None)])
def test_reference_checkpoint_round_trips_with_strict_loading(tmp_path: Path, fmt: str, wrap: str | None) -> None:
    path, net = _tiny_reference(tmp_path, False, wrap, fmt)
    loaded = read_checkpoint(path)
    assert loaded.keys() == net.state_dict().keys()
    source = get_family("dit").source(_recipe(path))
    for key, value in net.state_dict().items():
        assert torch.equal(source.network.state_dict()[key], value), key
    assert source.files == [path]  # what the run records (by reference) and hashes
    assert checkpoint_digest(source.files) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_ema_wins_over_model_in_a_training_checkpoint(tmp_path: Path) -> None:
    path, net = _tiny_reference(tmp_path, False, None, "pt")
    other = {k: v + 1 for k, v in net.state_dict().items()}
    torch.save({"model": other, "ema": net.state_dict()}, path)
    assert torch.equal(read_checkpoint(path)["pos_embed"], net.state_dict()["pos_embed"])


def test_learn_sigma_checkpoint_keeps_the_mean_channels(tmp_path: Path) -> None:
    path, net = _tiny_reference(tmp_path, True, "ema", "pt")
    source = get_family("dit").source(_recipe(path, learn_sigma=True))
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([3.0, 300.0, 900.0])
    y = torch.tensor([0, 5, 10])
    full = net(x, t, y)  # (3, 2C, 8, 8): mean channels first, then variance
    assert torch.allclose(source.network(x, t, y), full[:, :1], atol=1e-5)
    mask = variance_channel_mask(2, 1)
    assert mask.tolist() == [True, False] * 4  # channel index is fastest in the (p, p, 2C) layout


def test_block_from_checkpoint_holds_exactly_the_source_layers(tmp_path: Path) -> None:
    path, net = _tiny_reference(tmp_path, False, None, "pt")
    family = get_family("dit")
    source = family.source(_recipe(path))
    ref = net.state_dict()
    for start, end in [(0, 2), (2, 4)]:
        state = family.block_state(source, start, end)
        assert set(state) == set(block_key_map(start, end))
        for local in range(end - start):
            for name in ("attn.qkv.weight", "mlp.fc2.bias", "adaLN_modulation.1.weight"):
                assert torch.equal(state[f"blocks.{local}.{name}"], ref[f"blocks.{start + local}.{name}"])
        assert torch.equal(state["final_layer.linear.weight"], ref["final_layer.linear.weight"])
        assert torch.equal(state["y_embedder.embedding_table.weight"], ref["y_embedder.embedding_table.weight"])


def test_wrong_keys_or_shapes_are_one_line_errors(tmp_path: Path) -> None:
    path, net = _tiny_reference(tmp_path, False, None, "pt")
    state = net.state_dict()
    torch.save({**state, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="unknown key 'extra.weight'"):
        get_family("dit").source(_recipe(path))
    torch.save({k: v for k, v in state.items() if k != "pos_embed"}, path)
    with pytest.raises(CheckpointError, match="missing key 'pos_embed'"):
        get_family("dit").source(_recipe(path))
    torch.save({**state, "pos_embed": torch.zeros(1, 4, 8)}, path)
    with pytest.raises(CheckpointError, match="shape mismatch for 'pos_embed'"):
        get_family("dit").source(_recipe(path))


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path, fmt: str) -> None:
    path, _ = _tiny_reference(tmp_path, False, None, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        get_family("dit").source(_recipe(path))


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        get_family("dit").source(_recipe(tmp_path / "nope.pt"))


def test_sigma_to_timestep_maps_the_sigma_range_onto_ddpm_timesteps() -> None:
    noise = nz.NoiseSettings()
    t = sigma_to_timestep(torch.tensor([0.002, 80.0, 0.4]), noise)
    assert t[0].item() == pytest.approx(0.0, abs=1e-4) and t[1].item() == pytest.approx(999.0, abs=1e-3)
    expected = (
        999 * (torch.log(torch.tensor(0.4)) - torch.log(torch.tensor(0.002))) / torch.log(torch.tensor(80 / 0.002))
    )
    assert t[2].item() == pytest.approx(expected.item(), rel=1e-5)


def test_edm_denoiser_is_identity_at_tiny_sigma_and_follows_the_preconditioning() -> None:
    torch.manual_seed(0)
    net = DiT(DiTShape(8, 1, 10, 2, 32, 2, 2))
    for p in net.parameters():
        p.data.normal_(std=0.1)
    den = EDMDenoiser(net, nz.NoiseSettings())
    z, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    assert torch.allclose(den(z, torch.full((2,), 1e-6), y), z, atol=1e-5)
    sigma = torch.tensor([0.7, 3.0])
    s = sigma.reshape(-1, 1, 1, 1)
    f = net(nz.c_in(s, 0.5) * z, sigma_to_timestep(sigma, den.noise), y)
    assert torch.allclose(den(z, sigma, y), nz.c_skip(s, 0.5) * z + nz.c_out(s, 0.5) * f, atol=1e-6)


@pytest.mark.parametrize("saved", [True, False])
def test_a_learn_sigma_checkpoint_mislabelled_in_the_recipe_is_refused(tmp_path: Path, saved: bool) -> None:
    """Issue 32's planted layout mismatch for DiT: the variance channels said wrongly either way. dbconvert's
    DiT has the reference code's own layout (no installed library to run it against), so the key and shape
    check is what sees it: the final layer's rows differ."""
    path, _ = _tiny_reference(tmp_path, saved, None, "pt")
    with pytest.raises(
        CheckpointError, match=f"learn_sigma={not saved}.*variance channels.*set model.learn_sigma={str(saved).lower()}"
    ) as info:
        get_family("dit").source(_recipe(path, learn_sigma=not saved))
    assert "\n" not in str(info.value)
