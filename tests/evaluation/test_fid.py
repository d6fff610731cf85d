"""FID: parity with clean-fid, sanity (self ~ 0, shifted > 0), the CLI on a tiny run, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dbconvert.config import load_recipe
from tests.cli_helpers import assert_user_error, invoke


def invoke_q(*args: object):  # noqa: ANN201
    """Without progress messages, so stderr holds only the error line."""
    return invoke(*args, "-q")


@pytest.fixture(autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One feature/statistics cache for the whole session: the digits CNN is trained once."""
    path = tmp_path_factory.getbasetemp() / "dbconvert-cache"
    monkeypatch.setenv("DBCONVERT_CACHE", str(path))
    return path


@pytest.fixture
def spec():  # noqa: ANN201
    from dbconvert.evaluation.features import builtin_features

    return builtin_features(load_recipe("dit-tiny-digits").data)


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """digits test (359), 300 digits train images, and the test images shifted by 2 pixels."""
    from dbconvert.data.images import load_images
    from dbconvert.evaluation.fid import write_pngs

    cfg = load_recipe("dit-tiny-digits").data
    test, train = load_images(cfg, "test").x, load_images(cfg, "train").x[:300]
    out = {"test": tmp_path / "test", "train": tmp_path / "train", "shifted": tmp_path / "shifted"}
    write_pngs(test, out["test"])
    write_pngs(train, out["train"])
    write_pngs(torch.roll(test, shifts=(2, 2), dims=(2, 3)), out["shifted"])
    return out


def test_builtin_features_are_cached_and_accurate(spec) -> None:  # noqa: ANN001
    from dbconvert.evaluation.features import builtin_features

    assert spec.dim == 64 and spec.native_size == (8, 8) and spec.name.startswith("builtin-cnn:digits@")
    assert spec.info["test_accuracy"] > 0.9 and spec.info["test_images"] == 359
    again = builtin_features(load_recipe("dit-tiny-digits").data)
    assert again.name == spec.name and Path(again.info["weights"]).is_file()
    x = torch.rand(5, 3, 8, 8) * 255
    assert torch.equal(spec.extractor(x), again.extractor(x))


def test_cli_fid_of_two_folders_equals_cleanfid(folders, spec, in_tmp: Path) -> None:  # noqa: ANN001
    from cleanfid import fid as cleanfid

    from dbconvert.evaluation.features import native_resize

    res = invoke(
        "eval",
        "fid",
        "--samples",
        folders["test"],
        "--reference",
        folders["train"],
        "--features",
        "builtin:digits",
        "--json",
    )
    assert res.exit_code == 0, res.output
    ours = json.loads(res.stdout.strip().splitlines()[-1])
    direct = cleanfid.compute_fid(
        str(folders["test"]),
        str(folders["train"]),
        mode="clean",
        custom_feat_extractor=spec.extractor,
        custom_fn_resize=native_resize,
        device=torch.device("cpu"),
        num_workers=0,
        verbose=False,
    )
    assert ours["features"] == spec.name and ours["num_samples"] == 359
    assert abs(ours["value"] - direct) < 1e-6
    assert ours["value"] > 0 and ours["kid"]["values"][0] == pytest.approx(ours["kid"]["min"])


def test_fid_of_folder_with_itself_is_zero_and_of_shifted_copy_positive(folders) -> None:  # noqa: ANN001
    from dbconvert.evaluation.fid import evaluate_fid

    same = evaluate_fid(None, samples=folders["test"], reference=folders["test"], features="builtin:digits")
    shifted = evaluate_fid(None, samples=folders["shifted"], reference=folders["test"], features="builtin:digits")
    assert abs(same["value"]) < 1e-4
    assert shifted["value"] > 1.0 and shifted["value"] > 1e4 * max(abs(same["value"]), 1e-9)


def test_bad_sample_folders(folders, tmp_path: Path, in_tmp: Path) -> None:  # noqa: ANN001
    base = ("eval", "fid", "--reference", folders["test"], "--features", "builtin:digits")
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(70):
        Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(bad / f"{i:03d}.png")
    (bad / "broken.png").write_bytes(b"not a png")
    assert_user_error(invoke_q(*base, "--samples", bad), "cannot be read as an image")
    (bad / "broken.png").unlink()
    Image.fromarray(np.zeros((9, 9), np.uint8), "L").save(bad / "big.png")
    assert_user_error(invoke_q(*base, "--samples", bad), "different sizes")
    (bad / "big.png").unlink()
    for i in range(60):
        (bad / f"{i:03d}.png").unlink()
    assert_user_error(invoke_q(*base, "--samples", bad), "FID needs at least 65")
    assert_user_error(invoke_q(*base, "--samples", tmp_path / "nowhere"), "does not exist")
    assert_user_error(invoke_q("eval", "fid", "--samples", bad), "no current run")


def test_missing_inception_weights_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, folders, in_tmp: Path
) -> None:  # noqa: ANN001
    from dbconvert.evaluation import features

    missing = tmp_path / "cache" / features.INCEPTION_FILE
    monkeypatch.setattr(features, "inception_default_path", lambda: missing)
    monkeypatch.setattr(features, "inception_url", lambda: "http://dbconvert-offline.invalid/inception-2015-12-05.pt")
    args = ("eval", "fid", "--samples", folders["test"], "--reference", folders["train"], "--features", "inception")
    res = invoke_q(*args)
    assert_user_error(res, f"clean-fid looks for {missing}")
    assert "--inception-weights" in res.stderr and "dbconvert-offline.invalid" in res.stderr and not missing.exists()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    assert_user_error(invoke_q(*args, "--inception-weights", junk), "cannot load Inception weights")
    assert_user_error(invoke_q(*args, "--inception-weights", tmp_path / "nope.pt"), "does not exist")


def test_cli_fid_of_tiny_run_blocks_and_e2e(tiny_run, in_tmp: Path) -> None:  # noqa: ANN001
    from dbconvert.train import train_block, train_e2e

    assert_user_error(invoke_q("eval", "fid", "--num", "70"), "untrained blocks")
    for b in tiny_run.blocks:
        train_block(tiny_run, b.index, progress=False)
    assert_user_error(invoke_q("eval", "fid", "--num", "10"), "FID needs at least 65")
    assert_user_error(invoke_q("eval", "fid", "--model", "e2e", "--num", "70"), "e2e baseline is not trained")
    res = invoke("eval", "fid", "--num", "70", "--steps", "2", "--json")
    assert res.exit_code == 0, res.output
    blocks = json.loads(res.stdout.strip().splitlines()[-1])
    saved = json.loads(Path(blocks["file"]).read_text())
    for key in (
        "metric",
        "value",
        "model",
        "features",
        "num_samples",
        "sampler",
        "seed",
        "split",
        "seconds",
        "dbconvert_version",
        "kid",
    ):
        assert key in saved, key
    assert saved["model"] == "blocks" and saved["split"] == "test" and saved["sampler"]["steps"] == 2
    assert saved["features"].startswith("builtin-cnn:digits") and saved["num_samples"] == 70

    train_e2e(tiny_run, progress=False)
    res = invoke("eval", "fid", "--model", "e2e", "--num", "70", "--steps", "2", "--repeats", "2", "--json")
    assert res.exit_code == 0, res.output
    e2e = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(e2e["values"]) == 2 and e2e["value"] == min(e2e["values"]) <= e2e["mean"]
    assert e2e["values"][0] != e2e["values"][1]  # different seeds per repeat

    table = invoke("eval", "compare")
    assert table.exit_code == 0, table.output
    assert "blocks" in table.stdout and "e2e" in table.stdout and table.stdout.count("FID with features") == 1
    listed = json.loads(invoke("eval", "compare", "--json").stdout)
    assert sorted(r["model"] for r in listed) == ["blocks", "e2e"]


def test_fid_of_two_folders_needs_no_run_even_when_the_current_run_is_a_text_run(folders, in_tmp: Path) -> None:  # noqa: ANN001
    from tests.families.test_llama import CORPUS, tiny_overrides

    (in_tmp / "corpus.txt").write_text(CORPUS)
    split = invoke("split", "llama-tiny-shakespeare", *tiny_overrides(in_tmp / "corpus.txt"), "-b", "2", "--out", "lm")
    assert split.exit_code == 0, split.output  # now the current run
    res = invoke(
        "eval",
        "fid",
        "--samples",
        folders["shifted"],
        "--reference",
        folders["test"],
        "--features",
        "builtin:digits",
        "--json",
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["value"] > 1.0
    assert not (in_tmp / "lm" / "eval").exists()  # nothing written into the unrelated text run
    assert_user_error(invoke("eval", "fid", "--samples", folders["shifted"]), "needs a reference: give --reference DIR")


def test_a_sample_folder_of_non_finite_samples_is_refused(folders, tmp_path: Path, in_tmp: Path) -> None:  # noqa: ANN001
    nan = tmp_path / "nan"
    nan.mkdir()
    for i in range(70):
        Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(nan / f"{i:05d}.png")  # what NaN samples became
    np.savez(nan / "samples.npz", x=np.full((70, 1, 8, 8), np.nan, np.float32), y=np.zeros(70, np.int64))
    result = invoke_q("eval", "fid", "--samples", nan, "--reference", folders["test"], "--features", "builtin:digits")
    assert_user_error(result, "70 of the samples in")
