"""Every command through Typer's runner, including the bad-input cases (one line, exit 2, no traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY_OVERRIDES
from tests.cli_helpers import assert_user_error, invoke


@pytest.fixture
def cli_run(in_tmp: Path) -> Path:
    result = invoke("split", "dit-tiny-digits", *TINY_OVERRIDES, "--blocks", "4")
    assert result.exit_code == 0, result.output
    return in_tmp / "runs" / "dit-tiny-digits-B4"


def test_recipes_lists_and_shows() -> None:
    result = invoke("recipes")
    assert result.exit_code == 0 and "dit-tiny-digits" in result.output and "dit-s2-cifar10" in result.output
    shown = invoke("recipes", "--show", "dit-s2-cifar10")
    assert shown.exit_code == 0 and "DiT-S/2" in shown.output


def test_pipeline_split_info_train_sample(cli_run: Path) -> None:
    info = invoke("info", "--json")
    assert info.exit_code == 0
    blocks = json.loads(info.output)
    assert [b["index"] for b in blocks] == [0, 1, 2, 3]
    assert {"index", "layers", "owned_range", "train_range", "mass", "params"} <= set(blocks[0])
    assert blocks[0]["owned_range"][1] == 80.0
    table = invoke("info")
    assert table.exit_code == 0 and "owned sigma" in table.output

    untrained = invoke("sample", "--steps", "3")
    assert_user_error(untrained, "untrained blocks: block-00, block-01, block-02, block-03")

    for i in range(4):
        result = invoke("train-block", str(i), "-q")
        assert result.exit_code == 0, result.output
    sample = invoke("sample", "--steps", "3", "--num", "6", "--solver", "heun", "--guidance", "1.5")
    assert sample.exit_code == 0, sample.output
    out = cli_run / "samples" / "blocks-heun-3steps-g1.5-seed0"
    assert (out / "grid.png").is_file() and (out / "samples.npz").is_file() and len(list(out.glob("0*.png"))) == 6

    assert_user_error(invoke("sample", "--model", "e2e"), "e2e baseline is not trained")
    assert invoke("train-e2e", "--steps", "2", "-q").exit_code == 0
    assert invoke("sample", "--model", "e2e", "--steps", "2", "--num", "2", "--class", "3").exit_code == 0
    # a language model's options on an image run: one line naming the option, nothing sampled
    before = sorted(p.name for p in (cli_run / "samples").iterdir())
    assert_user_error(invoke("sample", "--prompt", "ROMEO:"), "--prompt does not apply to a dit run")
    assert_user_error(
        invoke("sample", "--top-p", "0.9"),
        "--top-p does not apply to a dit run (its sampling options: --class, --guidance)",
    )
    assert sorted(p.name for p in (cli_run / "samples").iterdir()) == before


def test_samples_are_deterministic_by_seed(cli_run: Path) -> None:
    import numpy as np

    for i in range(4):
        assert invoke("train-block", str(i), "-q").exit_code == 0
    a = invoke("sample", "--steps", "3", "--num", "4", "--seed", "7", "--out", "a")
    b = invoke("sample", "--steps", "3", "--num", "4", "--seed", "7", "--out", "b")
    c = invoke("sample", "--steps", "3", "--num", "4", "--seed", "8", "--out", "c")
    assert a.exit_code == b.exit_code == c.exit_code == 0
    xa, xb, xc = (np.load(f"{d}/samples.npz")["x"] for d in "abc")
    assert np.array_equal(xa, xb) and not np.array_equal(xa, xc)


def test_run_option_selects_another_run(cli_run: Path, in_tmp: Path) -> None:
    assert invoke("split", "dit-tiny-digits", *TINY_OVERRIDES, "--blocks", "2", "--out", "two").exit_code == 0
    assert len(json.loads(invoke("info", "--json").output)) == 2  # the last split is current
    assert len(json.loads(invoke("info", "--json", "--run", cli_run).output)) == 4


@pytest.mark.parametrize(
    "args,match",
    [
        (["split", "no-such-recipe"], "no recipe named 'no-such-recipe'"),
        (["split", "missing.yaml"], "not found"),
        (["split", "dit-tiny-digits", "train.lrr=1"], "unknown key 'train.lrr'"),
        (["split", "dit-tiny-digits", "--blocks", "0"], "--blocks must be"),
        (["split", "dit-tiny-digits", "--blocks", "3"], "do not divide"),
        (["split", "dit-tiny-digits", "--blocks", "9"], "between 1 and"),
        (["split", "dit-tiny-digits", "model.checkpoint=nope.pt"], "not found"),
        (["info"], "no current run"),
        (["train-block", "0"], "no current run"),
        (["sample"], "no current run"),
    ],
)
def test_bad_input_without_a_run(in_tmp: Path, args: list[str], match: str) -> None:
    assert_user_error(invoke(*args), match)


def test_malformed_recipe_file(in_tmp: Path) -> None:
    (in_tmp / "bad.yaml").write_text("name: x\nmodel: {family: dit\n")
    assert_user_error(invoke("split", "bad.yaml"), "malformed YAML")


def test_bad_input_with_a_run(cli_run: Path) -> None:
    assert_user_error(invoke("train-block", "4"), "block index 4 is out of range: this run has blocks 0..3")
    assert_user_error(invoke("train-block", "--", "-1"), "out of range")
    assert_user_error(invoke("train-block", "0", "noise.gamma=0.2"), "fixed when the run is split")
    assert_user_error(invoke("split", "dit-tiny-digits"), "already holds a run")
    assert_user_error(invoke("sample", "--solver", "rk4"), "--solver must be euler or heun")


def test_sample_flags_are_the_families_options(in_tmp: Path) -> None:
    """`sample`'s family flags are generated from each `Family.sample_options_type`: all of them (each marked with
    its families) without a run, the run's family's only in `--help` on a run; parsing takes any family's."""
    from dbconvert.families import family_names, get_family
    from dbconvert.families.sample_options import sample_flags

    every = {f.flag for n in family_names() for f in sample_flags(get_family(n).sample_options_type)}
    assert {"--class", "--guidance", "--prompt", "--images", "--max-new-tokens"} <= every
    shown = invoke("sample", "--help").stdout
    assert all(flag in shown for flag in every) and "(dit runs)" in shown and "(llama, recurrent runs)" in shown
    assert invoke("split", "dit-tiny-digits", *TINY_OVERRIDES, "-q").exit_code == 0
    on_dit = invoke("sample", "--help").stdout
    dit = {f.flag for f in sample_flags(get_family("dit").sample_options_type)}
    assert all(flag in on_dit for flag in dit) and not any(flag in on_dit for flag in every - dit)
    assert "--prompt" in invoke("sample", "--help", "--run", "nowhere").stdout  # no run there: every flag
    assert_user_error(
        invoke("sample", "--prompt", "hi"),
        "--prompt does not apply to a dit run (its sampling options: --class, --guidance); drop it",
    )
    assert_user_error(invoke("sample", "--max-new-tokens", "0"), "--max-new-tokens")  # its declared minimum


def test_corrupt_block_weights_are_reported_and_left_alone(cli_run: Path) -> None:
    weights = cli_run / "blocks" / "block-01" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = weights.read_bytes()
    assert_user_error(invoke("train-block", "1"), "corrupt or truncated")
    assert weights.read_bytes() == before


def test_unreachable_hub_data_is_a_clear_error(in_tmp: Path) -> None:
    result = invoke("split", "dit-s2-cifar10", "model.arch=DiT-Micro/2", "train.steps=1", "train.batch_size=2")
    assert result.exit_code == 0, result.output
    assert_user_error(invoke("train-block", "0"), "could not be loaded from the Hugging Face hub")


def test_python_m_dbconvert_works() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "dbconvert", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train-block" in out.stdout


def test_export_help_names_every_model_and_format() -> None:
    import re

    text = " ".join(re.sub("[\u2500-\u257f]", " ", invoke("export", "--help").stdout).split())  # no box lines
    for word in ("source", "e2e", "ar (text)", "classifier (ViT)", "Hugging Face folder", "timm"):
        assert word in text, word


def test_tables_never_cut_numbers_when_not_a_terminal() -> None:
    import io

    from rich.console import Console
    from rich.table import Table

    from dbconvert.cli.app import print_table

    table = Table(title="a long title " * 8)
    for col in ("block", "layers", "owned sigma", "training sigma", "mass", "params", "trained steps"):
        table.add_column(col)
    table.add_row("0", "[0, 30)", "2.637 – 80", "1.969 – 80", "0.2500", "112,778,880", "123456/200000")
    sink = io.StringIO()
    print_table(table, Console(file=sink, width=80, markup=False))  # a pipe: rich would assume 80 columns
    assert "112,778,880" in sink.getvalue() and "123456/200000" in sink.getvalue() and "…" not in sink.getvalue()


def test_paths_and_messages_are_printed_literally_never_as_markup(in_tmp: Path) -> None:
    out = "run[/b][bold]"
    result = invoke("split", "dit-tiny-digits", *TINY_OVERRIDES, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"run written to {in_tmp / out}" in result.stdout or f"run written to {out}" in result.stdout
    result = invoke("export", "[/INST].pt", "--run", out)
    assert result.exit_code == 0, result.output
    assert "to [/INST].pt" in result.stdout or "[/INST].pt" in result.stdout.replace(str(in_tmp) + "/", "")


def test_version_names_ours_and_the_libraries_a_bug_report_needs() -> None:
    from dbconvert import __version__

    for args in (["--version"], ["--version", "split"]):  # eager: answers before any command is parsed
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        line = result.stdout.strip()
        assert line.startswith(f"dbconvert {__version__} (python ") and "torch " in line and "timm " in line, line


def eval_help_pages() -> tuple[tuple[str, ...], ...]:
    """`eval --help`, `eval compare --help` and `eval NAME --help` of every registered metric (torch-free to list)."""
    from dbconvert.evaluation.metric import metric_names

    names = metric_names()
    assert {"accuracy", "bpc", "fid", "genppl", "mauve"} <= set(names)
    return (("eval", "--help"), ("eval", "compare", "--help"), *(("eval", n, "--help") for n in names))


HELP_WITHOUT_TORCH = (
    ("--help",),
    ("split", "--help"),
    ("train-block", "--help"),
    ("bench", "--help"),
    ("recipes", "--help"),
    ("export", "--help"),
    ("sample", "--help"),
    *eval_help_pages(),
)


@pytest.mark.parametrize("args", HELP_WITHOUT_TORCH, ids=[" ".join(a) for a in HELP_WITHOUT_TORCH])
def test_help_does_not_import_torch(args: tuple[str, ...]) -> None:
    """--help is read before anything runs (issue 33: 6-8 s, importing torch, timm and every family): these help
    pages import neither torch nor a family. `sample --help` reads the families' options from torch-free modules
    named by their registry entries; `eval --help` and `eval NAME --help` read the metrics' `MetricHelp` and the
    families' own metric tables the same way."""
    import subprocess
    import sys

    code = (
        "import sys\nsys.argv = ['dbconvert', *sys.argv[1:]]\nfrom dbconvert.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('IMPORTED', sorted(m for m in ('torch', 'timm', 'transformers', 'dbconvert.families.dit.family', "
        "'dbconvert.families.vit.family', 'dbconvert.families.llama.family') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert "Usage" in out.stdout and out.stdout.strip().splitlines()[-1] == "IMPORTED []", out.stdout[-300:]


def test_sample_help_on_a_run_reads_its_family_without_torch(tmp_path: Path) -> None:
    """`sample --run R --help` shows that run's family's options only, reading the manifest's family name without
    opening the run (no torch, no family module)."""
    import subprocess
    import sys

    (tmp_path / "manifest.yaml").write_text("format_version: 1\nfamily: vit\n")
    code = (
        "import sys\nsys.argv = ['dbconvert', 'sample', '--run', sys.argv[1], '--help']\n"
        "from dbconvert.cli.app import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('IMPORTED', sorted(m for m in ('torch', 'timm', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "IMPORTED []", out.stdout[-300:]
    assert "--images" in out.stdout and "--guidance" not in out.stdout and "vit run" in out.stdout


def test_help_lists_choices_and_shows_no_bool_type() -> None:
    sample = invoke("sample", "--help").stdout
    for choices in ("[euler|heun]", "[ema|model]", "[blocks|e2e|source|ar|"):
        assert choices in sample, choices
    for args in (("split", "--help"), ("train-block", "--help"), ("sample", "--help"), ("eval", "fid", "--help")):
        text = invoke(*args).stdout
        assert "<bool>" not in text and "--help" in text, args
