"""The ViT family: timm parity at conversion, checkpoints in (timm, Hugging Face) and out, the label table,
the denoiser's sampler, and split -> train -> eval accuracy / sample through the CLI on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dbconvert import noise as nz
from dbconvert.config import load_recipe
from tests.cli_helpers import assert_user_error, invoke

TINY = [
    "model.embed_dim=32",
    "model.depth=3",
    "model.num_heads=2",
    "model.global_pool=token",
    "train.steps=3",
    "train.epochs=null",
    "train.batch_size=16",
    "train.warmup_steps=0",
    "train.log_every=1",
    "train.checkpoint_every=3",
    "sample.num=8",
]
TIMM_SIZES = dict(
    img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0
)


def tiny_timm(seed: int = 0):  # noqa: ANN201 - timm.models.VisionTransformer
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_SIZES).eval()
    with torch.no_grad():  # timm initialises the position table and cls token near zero: make them matter
        model.pos_embed.normal_(std=0.5)
        model.cls_token.normal_(std=0.5)
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(std=0.1)
    return model


def tiny_hf_vit(depth: int = 3):  # noqa: ANN201 - transformers.ViTForImageClassification
    """A random Hugging Face ViT of TIMM_SIZES' width (seeded), for the folder-reading tests."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=depth,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=8,
        patch_size=2,
        num_channels=1,
        num_labels=10,
    )
    return ViTForImageClassification(config).eval()


def recipe(*extra: str):  # noqa: ANN201
    return load_recipe("vit-tiny-digits", [*TINY, *extra])


def test_each_copied_layer_computes_exactly_what_timm_computes(tmp_path: Path) -> None:
    from dbconvert.families import get_family

    ref = tiny_timm()
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    r = recipe(f"model.checkpoint={tmp_path / 'vit.pth'}")
    family = get_family("vit")
    source = family.source(r)
    net = source.network.eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(net.classify(x), ref(x))  # the whole classifier, bit for bit
        h = torch.randn(4, 17, 32)
        t = torch.tensor([0.0, 100.0, 500.0, 999.0])
        cond = net.t_embedder(t)  # a real noise embedding; the zero-initialised modulation ignores it
        for k in range(3):
            assert torch.equal(net.blocks[k](h, cond), ref.blocks[k](h))
        block = family.block_network(r, 1)
        block.load_state_dict(family.block_state(source, 2, 3))
        assert torch.equal(block.eval().blocks[0](h, cond), ref.blocks[2](h))


def test_denoiser_at_conversion_sees_the_image_tokens_as_timm_does(tmp_path: Path) -> None:
    """On the image tokens (everything but the label slot) the converted network's first layer is timm's."""
    from dbconvert.families import get_family

    ref = tiny_timm()
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    r = recipe(f"model.checkpoint={tmp_path / 'vit.pth'}")
    net = get_family("vit").source(r).network.eval()
    x, label = torch.randn(2, 1, 8, 8), torch.randn(2, 32)
    with torch.no_grad():
        ours = net.tokens(x, label)
        theirs = ref._pos_embed(ref.patch_embed(x))
        assert torch.equal(ours[:, 1:], theirs[:, 1:])
        assert torch.equal(ours[:, 0], label + ref.pos_embed[0, 0])  # the CLS slot holds the noisy label


def test_timm_safetensors_and_hugging_face_folder_convert(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from dbconvert.families import get_family

    ref = tiny_timm(1)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    net = get_family("vit").source(recipe(f"model.checkpoint={tmp_path / 'vit.safetensors'}")).network.eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(net.classify(x), ref(x))

    hf = tiny_hf_vit()
    hf.save_pretrained(str(tmp_path / "hf"))
    r = recipe(f"model.checkpoint={tmp_path / 'hf'}")
    src = get_family("vit").source(r)
    assert r.model.norm_eps == 1e-12  # the checkpoint's layer_norm_eps, recorded in the recipe
    with torch.no_grad():
        torch.testing.assert_close(src.network.eval().classify(x), hf(pixel_values=x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["model.patch_size=4"], "patch_size=2 (recipe 4); set model.patch_size=2"),
        (["model.depth=6"], "depth=3 (recipe 6); set model.depth=3"),
        (["model.num_classes=12"], "set model.num_classes=10"),  # the data's count, checked first
        # every mismatch in one line, each with its key (issue 33: one at a time, as bare tensor shapes)
        (
            ["model.depth=6", "model.mlp_ratio=4"],
            "depth=3 (recipe 6), mlp_ratio=2 (recipe 4); set model.depth=3 model.mlp_ratio=2",
        ),
    ],
)
def test_checkpoint_that_differs_from_the_recipe_is_one_line(in_tmp: Path, extra: list[str], match: str) -> None:
    torch.save(tiny_timm().state_dict(), in_tmp / "vit.pth")
    result = invoke("split", "vit-tiny-digits", *TINY, f"model.checkpoint={in_tmp / 'vit.pth'}", *extra)
    assert_user_error(result, match)
    assert not (in_tmp / "runs").exists()


def test_dit_and_vit_checkpoints_are_refused_by_the_other_family(in_tmp: Path) -> None:
    from dbconvert.families.dit.model import DiT

    from dbconvert.config import load_recipe as load

    dit = DiT(load("dit-tiny-digits", ["model.arch=DiT-Micro/2"]).model.shape())
    torch.save(dit.state_dict(), in_tmp / "dit.pt")
    assert_user_error(
        invoke("split", "vit-tiny-digits", *TINY, f"model.checkpoint={in_tmp / 'dit.pt'}"),
        "is a DiT checkpoint, not a ViT classifier",
    )
    torch.save(tiny_timm().state_dict(), in_tmp / "vit.pth")
    assert_user_error(
        invoke("split", "dit-tiny-digits", "model.arch=DiT-Micro/2", f"model.checkpoint={in_tmp / 'vit.pth'}"),
        "missing key",
    )
    assert not (in_tmp / "runs").exists()


def test_class_count_that_differs_from_the_data_is_one_line(in_tmp: Path) -> None:
    # fixed by split, so split checks them against the data (issue 34: they failed only at train-block)
    assert_user_error(
        invoke("split", "vit-tiny-digits", *TINY, "model.num_classes=12", "--out", "r"),
        "has 10 classes but model.num_classes is 12",
    )
    assert_user_error(
        invoke("split", "vit-tiny-digits", *TINY, "model.img_size=16", "--out", "r2"),
        "has images of shape (1, 8, 8) but the model takes",
    )
    assert not (in_tmp / "r").exists() and not (in_tmp / "r2").exists()
    assert_user_error(
        invoke("split", "vit-tiny-digits", *TINY, "model.patch_size=3", "--out", "r3"),
        "not divisible by the patch size",
    )


def test_label_table_is_shared_normalised_and_head_rows_for_a_checkpoint(tmp_path: Path) -> None:
    from dbconvert.families.vit.convert import label_table
    from dbconvert.split import split

    fresh = split(recipe(), out=tmp_path / "fresh", make_current=False)
    table = fresh.family().table()
    torch.testing.assert_close(table @ table.T, torch.eye(10), atol=1e-5, rtol=0)  # orthonormal rows
    assert fresh.recipe.model.label_table == "orthonormal"
    ref = tiny_timm()
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    conv = split(recipe(f"model.checkpoint={tmp_path / 'vit.pth'}"), out=tmp_path / "conv", make_current=False)
    torch.testing.assert_close(conv.family().table(), ref.head.weight / ref.head.weight.norm(dim=-1, keepdim=True))
    assert conv.recipe.model.label_table == "head"
    many = label_table("orthonormal", torch.empty(50, 8), 0)  # more classes than dimensions: unit rows
    torch.testing.assert_close(many.norm(dim=-1), torch.ones(50))


def test_inference_levels_are_evenly_spaced_in_the_cdf_one_per_block() -> None:
    from dbconvert.families.vit.objective import cdf_levels

    noise = nz.NoiseSettings()
    levels = cdf_levels(4, noise)
    assert levels[0] == noise.sigma_max and levels[-1] == noise.sigma_min
    cdf = np.array([noise.cdf(s) for s in levels])
    np.testing.assert_allclose(np.diff(cdf), np.diff(cdf)[0], rtol=1e-9)
    owned = nz.owned_ranges(nz.boundaries(noise, 4))
    assert [nz.owner_of(s, owned) for s in levels] == [0, 1, 2, 3]
    assert cdf_levels(1, noise) == [noise.sigma_max]


def test_euler_steps_towards_the_softmax_mean_of_the_table() -> None:
    from dbconvert.families.vit.objective import classify_steps

    table = torch.eye(3)
    seen = []

    def logits_of(k: int, z: torch.Tensor, s: float) -> torch.Tensor:
        seen.append((k, s, z.clone()))
        return torch.tensor([[50.0, 0.0, 0.0]])  # certain of class 0

    z0 = torch.tensor([[1.0, 2.0, 3.0]])
    out = classify_steps(
        logits_of, lambda lg: torch.softmax(lg, -1) @ table, [(1.0, 10.0), (0.1, 1.0)], [10.0, 0.5], z0
    )
    assert [k for k, _, _ in seen] == [0, 1] and len(out) == 2
    # one Euler step from 10 to 0.5 towards D = e_0: z + (0.5 - 10) (z - e_0) / 10
    torch.testing.assert_close(seen[1][2], z0 + (0.5 - 10.0) * (z0 - table[0]) / 10.0)


def test_heun_adds_the_trapezoid_correction_with_the_model_owning_the_next_level() -> None:
    from dbconvert.families.vit.objective import classify_steps
    from dbconvert.solvers import heun

    table = torch.eye(3)
    seen = []

    def logits_of(k: int, z: torch.Tensor, s: float) -> torch.Tensor:
        seen.append((k, s, z.clone()))
        return torch.tensor([[50.0, 0.0, 0.0]]) if k == 0 else torch.tensor([[0.0, 50.0, 0.0]])

    def denoised(lg: torch.Tensor) -> torch.Tensor:
        return torch.softmax(lg, -1) @ table

    z0 = torch.tensor([[1.0, 2.0, 3.0]])
    out = classify_steps(logits_of, denoised, [(1.0, 10.0), (0.1, 1.0)], [10.0, 0.5], z0, heun)
    # level 10 (block 0), Heun's correction at 0.5 (block 1), then level 0.5 (block 1) at the corrected z
    assert [(k, s) for k, s, _ in seen] == [(0, 10.0), (1, 0.5), (1, 0.5)] and len(out) == 2
    d0 = (z0 - table[0]) / 10.0
    euler = z0 + (0.5 - 10.0) * d0
    torch.testing.assert_close(seen[1][2], euler)
    corrected = z0 + (0.5 - 10.0) * 0.5 * (d0 + (euler - table[1]) / 0.5)
    torch.testing.assert_close(seen[2][2], corrected)


def test_lambda_weighted_cross_entropy_and_its_uniform_option() -> None:
    from dbconvert.families import get_family
    from dbconvert.families.vit.objective import diffusion_loss

    r = recipe()
    family = get_family("vit").for_bench(r)
    den = family.denoiser(r, family.block_network(r, 1), r.noise.settings())
    batch = family.synthetic_batch(r, 8, torch.Generator().manual_seed(0))
    lam, stats = diffusion_loss(den, batch, (0.5, 0.5), torch.Generator().manual_seed(1))
    uni, _ = diffusion_loss(den, batch, (0.5, 0.5), torch.Generator().manual_seed(1), weighting="uniform")
    weight = nz.loss_weight(torch.tensor(0.5), 0.5).item()
    assert lam.item() == pytest.approx(weight * uni.item(), rel=1e-5)
    assert uni.item() == pytest.approx(stats["ce"], rel=1e-5)


def test_split_train_eval_sample_export_through_the_cli(in_tmp: Path) -> None:
    import timm
    from PIL import Image

    assert invoke("split", "vit-tiny-digits", *TINY, "--out", "r").exit_code == 0
    for i in range(3):
        assert invoke("train-block", str(i), "-q").exit_code == 0
    assert invoke("train-e2e", "-q").exit_code == 0
    assert invoke("train-e2e", "--objective", "classifier", "-q").exit_code == 0
    assert (in_tmp / "r" / "classifier" / "ema.safetensors").is_file()

    result = invoke("eval", "accuracy", "--json")
    assert result.exit_code == 0, result.output
    blocks = json.loads(result.stdout)
    assert len(blocks["per_step_top1"]) == 3 and blocks["per_step_top1"][-1] == blocks["top1"]
    assert blocks["images"] == 359 and 0 <= blocks["ece"] <= 1 and blocks["top5"] >= blocks["top1"]
    saved = json.loads(Path(blocks["file"]).read_text())
    assert saved["top1"] == blocks["top1"]
    five = json.loads(invoke("eval", "accuracy", "--model", "e2e", "--steps", "5", "--json").stdout)
    assert len(five["per_step_top1"]) == 5 and Path(five["file"]).name.startswith("accuracy-e2e-pixels-test-5-")
    table = invoke("eval", "compare").stdout  # rendered by the accuracy metric's own columns
    assert "top-1 accuracy with features pixels (higher is better)" in table and f"{blocks['top1']:.4f}" in table
    ref = json.loads(invoke("eval", "accuracy", "--model", "classifier", "--json").stdout)
    assert len(ref["per_step_top1"]) == 1
    assert_user_error(invoke("eval", "accuracy", "--model", "classifier", "--steps", "2"), "--steps applies")
    heun = json.loads(invoke("eval", "accuracy", "--solver", "heun", "--json").stdout)  # honoured, not dropped
    assert heun["sampler"]["solver"] == "heun" and "-heun3-" in Path(heun["file"]).name
    assert "solver" not in blocks["sampler"] and Path(blocks["file"]).is_file()  # Euler's record and name unchanged
    assert heun["per_step_top1"][0] == blocks["per_step_top1"][0]  # the first level is the same evaluation

    images = in_tmp / "imgs"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8), "L").save(images / f"{i}.png")
    assert invoke("sample", "--num", "5", "-q").exit_code == 0  # the test split's predictions ...
    test_split = next((in_tmp / "r" / "samples").glob("blocks-classify-test5-*")) / "predictions.csv"
    before = test_split.read_bytes()
    result = invoke("sample", "--images", images, "-q")
    assert result.exit_code == 0, result.output
    out = next((in_tmp / "r" / "samples").glob("blocks-classify-images-imgs-*"))
    assert test_split.read_bytes() == before and len(before.splitlines()) == 6  # ... are not replaced (issue 33)
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0] == "image,prediction,probability" and [r.split(",")[0] for r in rows[1:]] == [
        "0.png",
        "1.png",
        "2.png",
    ]
    assert np.load(out / "probs.npz")["probs"].shape == (3, 3, 10)  # steps x images x classes
    Image.fromarray(np.zeros((9, 9), dtype=np.uint8), "L").save(images / "big.png")
    assert_user_error(invoke("sample", "--images", images, "-q"), "is 9x9 but the model takes 8x8")

    assert_user_error(invoke("export", "e2e.pth", "--model", "e2e"), "export --model source or --model classifier")
    assert invoke("export", "clf.pth", "--model", "classifier").exit_code == 0
    assert invoke("export", "again.pth", "--model", "classifier").exit_code == 0
    assert (in_tmp / "clf.pth").read_bytes() == (in_tmp / "again.pth").read_bytes()  # byte-reproducible, as DiT's
    exported = invoke("export", "clf-hf", "--model", "classifier")
    assert exported.exit_code == 0 and "Writing model shards" not in exported.stderr  # no transformers bar
    from dbconvert.families.vit.convert import timm_kwargs
    from dbconvert.rundir import Run

    run = Run.open(in_tmp / "r")
    loaded = timm.create_model(
        "vit_tiny_patch16_224", checkpoint_path=str(in_tmp / "clf.pth"), **timm_kwargs(run.recipe.model.shape())
    ).eval()
    x = torch.randn(2, 1, 8, 8)
    from dbconvert.checkpoint import load_weights

    net = run.family().block_network(run.recipe, 3)
    net.load_state_dict(load_weights(in_tmp / "r" / "classifier" / "ema.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(x), net.eval().classify(x))
        from transformers import ViTForImageClassification

        hf = ViTForImageClassification.from_pretrained(str(in_tmp / "clf-hf")).eval()
        torch.testing.assert_close(hf(pixel_values=x).logits, net.classify(x), atol=1e-5, rtol=1e-5)


def test_augmentation_is_deterministic_by_batch_and_changes_images() -> None:
    from dbconvert.families.vit.config import Augment
    from dbconvert.families.vit.data import augment_images

    x = torch.rand(6, 3, 8, 8) * 2 - 1
    aug = Augment(crop_padding=2, flip=True, randaugment="rand-m9-n2-mstd0.5")
    a = augment_images(x, aug, torch.Generator().manual_seed(3))
    b = augment_images(x, aug, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
    flip_only = augment_images(x, Augment(flip=True), torch.Generator().manual_seed(0))
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(-1)) for f, o in zip(flip_only, x))


def test_fresh_network_from_a_timm_name_and_bad_names() -> None:
    r = recipe(
        "model.arch=vit_tiny_patch16_224",
        "model.depth=null",
        "model.embed_dim=null",
        "model.num_heads=null",
        "model.img_size=32",
        "model.in_chans=3",
        "model.patch_size=8",
    )
    shape = r.model.shape()
    assert (shape.embed_dim, shape.num_heads, shape.depth, shape.mlp_ratio) == (192, 3, 12, 4.0)
    assert_user_error(invoke("split", "vit-tiny-digits", "model.arch=vit_nope"), "is neither one of vit-micro")
    assert_user_error(invoke("split", "vit-tiny-digits", "model.arch=resnet18"), "not a VisionTransformer")


def test_cosine_learning_rate_after_warm_up() -> None:
    from dbconvert.trainstep import learning_rate

    r = load_recipe("vit-tiny-digits", ["train.lr=1.0", "train.warmup_steps=10", "train.lr_schedule=cosine"])
    assert learning_rate(r, 4, 110) == pytest.approx(0.5)  # linear warm-up
    assert learning_rate(r, 10, 110) == pytest.approx(1.0)
    assert learning_rate(r, 60, 110) == pytest.approx(0.5)  # half way through the decay
    assert learning_rate(r, 110, 110) == pytest.approx(0.0, abs=1e-12)
    constant = load_recipe("vit-tiny-digits", ["train.lr=1.0", "train.warmup_steps=10", "train.lr_schedule=constant"])
    assert learning_rate(constant, 60, 110) == 1.0


def test_image_folder_trains_and_hub_data_offline_is_one_line(in_tmp: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("cat", "dog", "eel"):
            folder = in_tmp / "imgs" / split / label
            folder.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), "RGB").save(folder / f"{i}.png")
    args = [
        *TINY,
        "data.source=imgs",
        "model.in_chans=3",
        "model.num_classes=3",
        "train.batch_size=6",
        "model.augment.flip=true",
        "model.augment.crop_padding=1",
    ]
    assert invoke("split", "vit-tiny-digits", *args, "--out", "r").exit_code == 0
    assert invoke("train-block", "0", "-q").exit_code == 0
    assert json.loads(invoke("eval", "accuracy", "--model", "source", "--json").stdout)["images"] == 18

    assert invoke("split", "vit-cifar100", *TINY, "--out", "c").exit_code == 0
    assert_user_error(invoke("train-block", "0", "--run", "c"), "could not be loaded from the Hugging Face hub")


def test_a_low_rank_modulation_converts_exactly_and_is_smaller(tmp_path: Path) -> None:
    """model.adaln_rank: Linear(D, r) then Linear(r, 6D), the last zero, so the converted layers are timm's."""
    from dbconvert.families import get_family

    ref = tiny_timm()
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    family = get_family("vit")
    full = family.source(recipe(f"model.checkpoint={tmp_path / 'vit.pth'}"))
    r = recipe(f"model.checkpoint={tmp_path / 'vit.pth'}", "model.adaln_rank=4")
    lean = family.source(r)
    net = lean.network.eval()
    assert net.blocks[0].adaLN_modulation[1].weight.shape == (4, 32)
    h, t = torch.randn(2, 17, 32), torch.tensor([3.0, 700.0])
    block = family.block_network(r, 2)  # a block's state takes the low-rank keys (split refused them once)
    block.load_state_dict(family.block_state(lean, 1, 3))
    with torch.no_grad():
        assert torch.equal(net.blocks[1](h, net.t_embedder(t)), ref.blocks[1](h))
        assert torch.equal(block.eval().blocks[0](h, net.t_embedder(t)), ref.blocks[1](h))
    count = lambda s: sum(v.numel() for k, v in s.state.items() if "adaLN" in k)  # noqa: E731
    assert count(lean) == 3 * (4 * 32 + 6 * 32 * 4 + 6 * 32) < count(full) == 3 * (6 * 32 * 32 + 6 * 32)


def test_avg_pooled_timm_vit_must_be_said_and_then_converts_exactly(in_tmp: Path) -> None:
    """Issue 32: an avg-pooled timm ViT (fc_norm=False) has a CLS ViT's keys and converted silently as one."""
    import timm

    from dbconvert.families import get_family
    from dbconvert.families.vit.convert import timm_kwargs

    torch.manual_seed(2)
    ref = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, global_pool="avg", fc_norm=False, **TIMM_SIZES
    ).eval()
    torch.save(ref.state_dict(), in_tmp / "avg.pth")
    unsaid = [t for t in TINY if not t.startswith("model.global_pool")]
    result = invoke("split", "vit-tiny-digits", *unsaid, f"model.checkpoint={in_tmp / 'avg.pth'}")
    assert_user_error(result, "does not record its pooling")
    assert not (in_tmp / "runs").exists()

    r = load_recipe("vit-tiny-digits", [*unsaid, f"model.checkpoint={in_tmp / 'avg.pth'}", "model.global_pool=avg"])
    src = get_family("vit").source(r)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(src.network.eval().classify(x), ref(x), atol=1e-5, rtol=1e-5)
        token = load_recipe("vit-tiny-digits", [*TINY, f"model.checkpoint={in_tmp / 'avg.pth'}"])
        assert (get_family("vit").source(token).network.eval().classify(x) - ref(x)).abs().max() > 1e-2
    assert any("num_heads=2 (from model.num_heads)" in n and "global_pool=avg" in n for n in src.notes)
    assert timm_kwargs(r.model.shape())["global_pool"] == "avg"  # and so the timm export rebuilds it

    result = invoke(
        "split",
        "vit-tiny-digits",
        *unsaid,
        f"model.checkpoint={in_tmp / 'avg.pth'}",
        "model.global_pool=avg",
        "--out",
        "avg",
    )
    assert result.exit_code == 0, result.output
    assert "global_pool=avg" in result.stderr  # the assumption is said at split
    assert_user_error(invoke("export", "hf-out", "--model", "source", "--run", "avg"), "reads the CLS token")
    assert not (in_tmp / "hf-out").exists()


def test_split_refuses_a_conversion_whose_function_differs_from_timm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The function check: keys and shapes all fit, but the weights are read in another layout (the q and v rows of
    the fused qkv read in another order, as a mislabelled layout would); split compares with timm's own forward and
    refuses."""
    import dbconvert.families.vit.family as vit_family
    from dbconvert.errors import CheckpointError
    from dbconvert.families import get_family
    from dbconvert.tensorio import LazyState

    state = tiny_timm(3).state_dict()
    for key in ("blocks.1.attn.qkv.weight", "blocks.1.attn.proj.weight"):  # timm's init leaves attention near
        state[key].normal_(std=0.3, generator=torch.Generator().manual_seed(1))  # uniform: make it matter
    torch.save(state, tmp_path / "vit.pth")
    get_family("vit").source(recipe(f"model.checkpoint={tmp_path / 'vit.pth'}"))  # the true layout passes
    original = vit_family.source_state

    def misread(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        state = original(*args, **kwargs)
        read = state.loaders["blocks.1.attn.qkv.weight"]

        def vkq() -> torch.Tensor:
            w = read()
            d = w.shape[1]
            return torch.cat([w[2 * d :], w[d : 2 * d], w[:d]])  # v, k, q

        return LazyState({**state.loaders, "blocks.1.attn.qkv.weight": vkq}, state.specs, state.release, state.origins)

    monkeypatch.setattr(vit_family, "source_state", misread)
    with pytest.raises(CheckpointError, match="differ from timm's forward of the same weights by up to"):
        get_family("vit").source(recipe(f"model.checkpoint={tmp_path / 'vit.pth'}"))


def test_accuracy_on_training_images_is_said_and_recorded(in_tmp: Path) -> None:
    """--split train, or a data.test_source that is a byte copy of the training images under another name:
    the result and its table say it scored training images; an empty --split is refused (issue 34)."""
    import shutil

    from dbconvert.data.images import write_random_images

    write_random_images(in_tmp / "train.npz", 40, (1, 8, 8), 10, seed=3)
    shutil.copy(in_tmp / "train.npz", in_tmp / "copy.npz")
    args = [*TINY, "data.source=train.npz", "data.kind=npz", "data.test_source=copy.npz"]
    assert invoke("split", "vit-tiny-digits", *args, "--out", "r").exit_code == 0
    copied = invoke("eval", "accuracy", "--model", "source", "--json")
    r = json.loads(copied.stdout.strip().splitlines()[-1])
    assert r["reference_overlaps_training"] is True and r["reference_overlap_images"] == 40
    assert r["reference"].startswith("copy.npz:test")
    table = invoke("eval", "accuracy", "--model", "source", "--split", "train")
    assert table.exit_code == 0 and "reference overlaps training" in table.stdout and "YES" in table.stdout
    assert "overlaps the training data" in table.stderr
    assert_user_error(invoke("eval", "accuracy", "--model", "source", "--split", ""), "--split is empty")

    assert invoke("split", "vit-tiny-digits", *TINY, "--out", "d").exit_code == 0  # digits: train and test apart
    held_out = json.loads(invoke("eval", "accuracy", "--model", "source", "--json", "-q").stdout.strip())
    assert held_out["reference_overlaps_training"] is False and held_out["reference_overlap_images"] == 0


def test_hugging_face_label_order_is_mapped_to_the_data_classes(tmp_path: Path) -> None:
    """A classifier saved with its head rows reversed and id2label saying so converts to the data's class order
    (issue 34: it scored top-1 0.014); placeholder names keep the order; names of other classes are a note."""
    from transformers import ViTConfig, ViTForImageClassification

    from dbconvert.families import get_family

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=8,
        patch_size=2,
        num_channels=1,
        num_labels=10,
    )
    hf = ViTForImageClassification(config).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        want = hf(pixel_values=x).logits  # row k = digit k
        hf.classifier.weight.copy_(hf.classifier.weight.flip(0))
        hf.classifier.bias.copy_(hf.classifier.bias.flip(0))
    hf.config.id2label = {i: str(9 - i) for i in range(10)}  # row i now scores digit 9 - i, and says so
    hf.config.label2id = {str(9 - i): i for i in range(10)}
    hf.save_pretrained(str(tmp_path / "reversed"))
    src = get_family("vit").source(recipe(f"model.checkpoint={tmp_path / 'reversed'}"))
    with torch.no_grad():
        torch.testing.assert_close(src.network.eval().classify(x), want, atol=1e-5, rtol=1e-5)
    assert any("reordered by the checkpoint's id2label" in n for n in src.notes)

    hf.config.id2label = {i: f"LABEL_{i}" for i in range(10)}  # placeholders: the rows as they are
    hf.config.label2id = {f"LABEL_{i}": i for i in range(10)}
    hf.save_pretrained(str(tmp_path / "plain"))
    plain = get_family("vit").source(recipe(f"model.checkpoint={tmp_path / 'plain'}"))
    with torch.no_grad():
        torch.testing.assert_close(plain.network.eval().classify(x), want.flip(-1), atol=1e-5, rtol=1e-5)
    assert not any("id2label" in n for n in plain.notes)

    hf.config.id2label = {i: f"class-{i}" for i in range(10)}
    hf.config.label2id = {f"class-{i}": i for i in range(10)}
    hf.save_pretrained(str(tmp_path / "other"))
    other = get_family("vit").source(recipe(f"model.checkpoint={tmp_path / 'other'}"))
    assert any("id2label names other classes" in n for n in other.notes)


def test_an_id2label_without_class_indices_is_one_line() -> None:
    from dbconvert.errors import CheckpointError
    from dbconvert.families.vit.convert import label_order

    with pytest.raises(CheckpointError, match="id2label has keys that are not class indices"):
        label_order({"a": "cat", "b": "dog"}, ["cat", "dog"], "checkpoint x")


def test_a_hugging_face_folder_of_the_other_transformers_layout_converts_and_passes_the_function_check(
    tmp_path: Path,
) -> None:
    """A folder saved by transformers 4 (`vit.encoder.layer.{k}.attention.attention.query`) read by transformers 5, or
    the reverse: the conversion and the layer-by-layer reference both read it through the layouts' key maps."""
    from safetensors.torch import load_file, save_file

    from dbconvert.families import get_family
    from dbconvert.families.vit.convert import HF_LAYER, hf_full_map, hf_layout

    hf = tiny_hf_vit()
    hf.save_pretrained(str(tmp_path / "hf"))
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(weights))
    installed = hf_layout(state)
    other = next(layout for layout in HF_LAYER if layout != installed)
    rename = {theirs: hf_full_map(3, other)[ours] for ours, theirs in hf_full_map(3, installed).items()}
    save_file({rename[k]: v for k, v in state.items()}, str(weights), metadata={"format": "pt"})
    x = torch.randn(3, 1, 8, 8)
    net = get_family("vit").source(recipe(f"model.checkpoint={tmp_path / 'hf'}")).network.eval()
    with torch.no_grad():
        torch.testing.assert_close(net.classify(x), hf(pixel_values=x).logits, atol=1e-5, rtol=1e-5)


def test_streamed_layers_hold_one_layer_at_a_time_and_stream_a_slice_too() -> None:
    """The function check's reference layers: each holds its weights only while it runs (the rest stay on the meta
    device), after the pass all are on meta again, and a slice (`layers[:n]`, as some libraries iterate) streams."""
    from torch import nn

    from dbconvert.families.vit.convert import StreamedLayers

    weights = [{"weight": torch.full((2, 2), float(k + 1)), "bias": torch.zeros(2)} for k in range(3)]
    with torch.device("meta"):
        layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    resident: list[list[bool]] = []

    streamed = StreamedLayers(layers, lambda k: weights[k])
    out = []
    for layer in streamed:
        resident.append([not m.weight.is_meta for m in layers])
        out.append(layer(torch.ones(1, 2)).detach())
    assert resident == [[True, False, False], [False, True, False], [False, False, True]]
    assert all(m.weight.is_meta for m in layers)
    assert [float(o[0, 0]) for o in out] == [2.0, 4.0, 6.0]
    with torch.no_grad():
        assert torch.equal(streamed(torch.ones(1, 2)), torch.full((1, 2), 48.0))
        assert [float(layer(torch.ones(1, 2))[0, 0]) for layer in streamed[1:]] == [4.0, 6.0]
    assert len(streamed[:2]) == 2 and all(m.weight.is_meta for m in layers)
    with pytest.raises(TypeError):
        streamed[0]
