"""Text data: local files through the `datasets` text builder, packing, splits, seeds, errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dbconvert.config import DataConfig
from dbconvert.data.text import (
    BUILTIN_TEXT,
    load_text,
    local_files,
    read_documents,
    resolve_kind,
    text_split_overlaps_training,
)
from dbconvert.errors import DataError
from dbconvert.tokenizer import Tokenizer, TokenizerError, train_bpe

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"
TEXT = "\n\n".join(f"Speaker {i}:\nline number {i} of the play, said twice; line number {i}." for i in range(60))


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def tok(tmp_path: Path, text_file: Path) -> Tokenizer:
    return Tokenizer(train_bpe([TEXT], 300, tmp_path / "tok.json"))


def test_documents_by_unit(text_file: Path) -> None:
    lines = read_documents(DataConfig(source=str(text_file), kind="text", text_unit="line"))
    paragraphs = read_documents(DataConfig(source=str(text_file), kind="text", text_unit="paragraph"))
    whole = read_documents(DataConfig(source=str(text_file), kind="text", text_unit="document"))
    assert len(lines) == 120 and len(paragraphs) == 60 and len(whole) == 1


def test_folder_and_glob(tmp_path: Path, text_file: Path) -> None:
    (tmp_path / "b.txt").write_text("more text\n")
    assert local_files(str(tmp_path)) == [text_file.resolve(), (tmp_path / "b.txt").resolve()]
    assert local_files(str(tmp_path / "*.txt")) == local_files(str(tmp_path))


def test_packing_splits_and_seed(text_file: Path, tok: Tokenizer) -> None:
    cfg = DataConfig(source=str(text_file), kind="text", text_unit="paragraph", val_fraction=0.2)
    train = load_text(cfg, tok, 16)
    val = load_text(cfg, tok, 16, split="val")
    assert train.tokens.shape[1] == 16 and train.tokens.dtype == torch.int64
    assert len(val) == round(0.2 * (len(train) + len(val)))
    rows = {tuple(r) for r in train.tokens.tolist()}
    assert not rows & {tuple(r) for r in val.tokens.tolist()}
    assert (train.tokens == tok.eos_id).sum() > 0  # EOS between documents
    assert torch.equal(load_text(cfg, tok, 16).tokens, train.tokens)
    assert not torch.equal(load_text(cfg.model_copy(update={"split_seed": 1}), tok, 16).tokens, train.tokens)
    (batch,) = train.batch(torch.tensor([0, 2]))
    assert batch.shape == (2, 16)


def test_bad_text_sources(tmp_path: Path, tok: Tokenizer) -> None:
    with pytest.raises(DataError, match="no text files"):
        read_documents(DataConfig(source=str(tmp_path / "missing.txt"), kind="text"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        read_documents(DataConfig(source=str(tmp_path / "empty.txt"), kind="text"))
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 100)
    with pytest.raises(DataError, match="cannot read"):
        read_documents(DataConfig(source=str(tmp_path / "binary.txt"), kind="text"))
    (tmp_path / "short.txt").write_text("tiny\n")
    with pytest.raises(DataError, match="fewer than one context"):
        load_text(DataConfig(source=str(tmp_path / "short.txt"), kind="text"), tok, 64)
    with pytest.raises(DataError, match="val_fraction"):
        load_text(DataConfig(source=str(tmp_path / "short.txt"), kind="text"), tok, 4, split="val")


def test_hub_name_offline_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        read_documents(DataConfig(source="dbconvert-test/no-such-text-set", kind="hub"))
    assert "\n" not in str(err.value) and "load_dataset" in str(err.value)


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer(tmp_path / "bad.json")
    with pytest.raises(TokenizerError, match="vocab_size >= 257"):
        train_bpe(["abc"], 100, tmp_path / "t.json")


def test_sentencepiece_model(tmp_path: Path) -> None:
    import sentencepiece as spm

    (tmp_path / "corpus.txt").write_text(TEXT)
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=80, minloglevel=2
    )
    tok = Tokenizer(tmp_path / "sp.model")
    assert tok.vocab_size == 80 and tok.eos_id == 2
    assert tok.decode(tok.encode("line number 7")) == "line number 7"


def shipped_text_recipes() -> list[str]:
    from dbconvert.config import load_recipe, shipped_recipes

    return [n for n in shipped_recipes() if load_recipe(n).data.source in BUILTIN_TEXT]


def test_every_shipped_text_recipe_finds_its_data_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 33: the CPU text recipes used `../shared/data/...`, a path outside the repository, so a clone failed."""
    from dbconvert.config import load_recipe

    monkeypatch.chdir(tmp_path)
    names = shipped_text_recipes()
    assert {"llama-tiny-shakespeare", "md4-tiny-shakespeare", "huginn-tiny-shakespeare"} <= set(names)
    for name in names:
        files = local_files(load_recipe(name).data.source)
        assert files == [BUILTIN_TEXT["tinyshakespeare"]] and files[0].stat().st_size > 1_000_000, name
    if SHAKESPEARE.is_file():  # the shipped copy is the shared corpus, byte for byte
        assert BUILTIN_TEXT["tinyshakespeare"].read_bytes() == SHAKESPEARE.read_bytes()
    cfg = DataConfig(source="tinyshakespeare")
    assert resolve_kind(cfg) == "text" and read_documents(cfg)[0].startswith("First Citizen")


def test_a_built_wheel_carries_the_built_in_text(tmp_path: Path) -> None:
    """Build a wheel from the package source, install it into a folder and resolve the recipe's data from there."""
    root = Path(__file__).resolve().parents[2]
    src = tmp_path / "src"
    shutil.copytree(root / "dbconvert", src / "dbconvert", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(root / "pyproject.toml", src / "pyproject.toml")
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("dbconvert-*.whl"))
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True, capture_output=True
    )
    code = (
        "import dbconvert; from dbconvert.config import load_recipe; from dbconvert.data.text import local_files;"
        "print(dbconvert.__file__); print(local_files(load_recipe('llama-tiny-shakespeare').data.source)[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
    ).stdout.split()
    site = (tmp_path / "site").resolve()
    assert Path(out[0]).resolve().is_relative_to(site), out  # the wheel's package, not the checkout
    assert Path(out[1]).is_relative_to(site) and Path(out[1]).stat().st_size > 1_000_000, out


def test_local_text_knows_train_and_val_only_and_says_which_overlaps_training(text_file: Path, tok: Tokenizer) -> None:
    cfg = DataConfig(source=str(text_file), kind="text", text_unit="paragraph", val_fraction=0.2)
    for name in ("test", "nope"):
        with pytest.raises(DataError, match="local text has the splits train and val"):
            load_text(cfg, tok, 16, split=name)  # it used to return the training rows
    assert text_split_overlaps_training(cfg, "train") and not text_split_overlaps_training(cfg, "val")
    hub = DataConfig(source="lm1b", kind="hub")
    assert text_split_overlaps_training(hub, "train") and not text_split_overlaps_training(hub, "test")
