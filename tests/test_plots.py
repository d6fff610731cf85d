"""`dbconvert plot` and dbconvert.plots: every figure from a tiny run is a readable PNG; missing data is one line.

Also the optional TensorBoard log (dbconvert.tblog), skipped where tensorboard is not installed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dbconvert import plots
from dbconvert.errors import DbconvertError, RunError
from dbconvert.evaluation.results import write_result
from dbconvert.rundir import Run
from dbconvert.families.dit.generate import write_images
from dbconvert.train import train_block, train_e2e
from tests.cli_helpers import assert_user_error, invoke

try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError:
    EventAccumulator = None
needs_tensorboard = pytest.mark.skipif(
    EventAccumulator is None, reason='tensorboard is not installed (pip install "dbconvert[tensorboard]")'
)


def assert_png(path: Path) -> tuple[int, int]:
    """A complete PNG of a size a screen shows at a glance; returns (width, height)."""
    from PIL import Image

    assert path.is_file() and path.parent.name == "plots", path
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()  # decodes every pixel: a truncated file fails here
        width, height = img.size
    assert 400 <= width <= 4000 and 250 <= height <= 4000, (path.name, img.size)
    assert not list(path.parent.glob(".*.tmp")), "a temporary file of an atomic write was left behind"
    return width, height


def fid_result(model: str, values: list[float], num: int = 1000) -> dict:
    """An `eval fid` result as evaluate_fid writes it (the fields plots read, and the ones result_name needs)."""
    kids = [v / 1000 for v in values]
    return {
        "metric": "fid",
        "value": min(values),
        "values": values,
        "min": min(values),
        "mean": float(np.mean(values)),
        "kid": {"values": kids, "min": min(kids), "mean": float(np.mean(kids))},
        "model": model,
        "features": "builtin-cnn:digits@5e1f0a2b",
        "num_samples": num,
        "split": "test",
        "repeats": len(values),
        "sampler": {"solver": "euler", "steps": 50, "guidance": 1.0},
        "seed": 0,
        "reference": "digits:test",
    }


def mauve_result(model: str, values: list[float]) -> dict:
    return {
        "metric": "mauve",
        "value": float(np.mean(values)),
        "values": values,
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)),
        "model": model,
        "features": "minilm (all-MiniLM-L6-v2, mean-pooled)",
        "num_samples": 500,
        "num_prompts": 100,
        "samples_per_prompt": 5,
        "split": "val",
        "sampler": {"solver": "euler", "steps": 20},
        "seed": 0,
        "reference": "val",
    }


# --- partition -----------------------------------------------------------------------------


def test_partition_figure_of_a_four_block_run(tiny_run: Run) -> None:
    assert tiny_run.num_blocks == 4
    width, height = assert_png(plots.plot_partition(tiny_run))
    assert width > height  # a wide density plot, not a squashed one
    assert_png(plots.plot_partition(tiny_run, compare_uniform=True))

    own = plots.partition_blocks(tiny_run, "equiprobable")
    assert [b["mass"] for b in own] == pytest.approx([0.25] * 4)
    uniform = plots.partition_blocks(tiny_run, "uniform")  # planned by split's own code, not drawn from memory
    widths = [math.log(b["owned_range"][1] / b["owned_range"][0]) for b in uniform]
    assert widths == pytest.approx([widths[0]] * 4) and sum(b["mass"] for b in uniform) == pytest.approx(1.0)
    assert max(b["mass"] for b in uniform) > 0.4  # uniform in ln(sigma) is far from equal mass

    noise = tiny_run.noise()
    x = np.linspace(math.log(noise.sigma_min), math.log(noise.sigma_max), 20001)
    density = noise.density(x)
    assert (density.sum() - (density[0] + density[-1]) / 2) * (x[1] - x[0]) == pytest.approx(
        1.0, rel=1e-4
    )  # trapezoid rule


# --- loss, eval, samples and `plot all` --------------------------------------------------


def test_every_figure_of_a_tiny_trained_run(tiny_run: Run) -> None:
    train_block(tiny_run, 0, progress=False)
    train_block(tiny_run, 3, progress=False)
    train_e2e(tiny_run, steps=2, progress=False)
    assert list(plots.training_curves(tiny_run)) == ["block-00", "block-03", "e2e"]
    assert_png(plots.plot_loss(tiny_run))

    eval_dir = tiny_run.root / "eval"
    write_result(eval_dir, fid_result("blocks", [31.8, 33.4, 32.5]))
    write_result(eval_dir, fid_result("e2e", [38.2]))
    write_result(eval_dir, mauve_result("blocks", [0.612, 0.655, 0.634]))
    assert_png(plots.plot_eval(tiny_run))

    x = torch.rand(16, 1, 8, 8) * 2 - 1
    write_images(tiny_run.root / "samples" / "blocks-euler-4steps-g1-seed0", x, torch.arange(16) % 10)
    write_images(tiny_run.root / "samples" / "e2e-euler-4steps-g1-seed0", -x, torch.arange(16) % 10)
    [strip] = plots.plot_samples(tiny_run)
    width, height = assert_png(strip)
    assert width > height  # two grids side by side

    result = invoke("plot", "all")  # the current run, as after `split`
    assert result.exit_code == 0, result.output
    printed = result.stdout.splitlines()
    assert [Path(p).name for p in printed] == ["partition.png", "loss.png", "eval.png", "samples.png"]
    for line in printed:
        assert_png(Path(line))


def test_results_spread_uses_the_file_or_the_values(tiny_run: Run) -> None:
    values = [31.8, 33.4, 32.5]
    _, mean, std = plots.result_spread(fid_result("blocks", values))  # FID files carry no std
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    mauve = mauve_result("e2e", [0.5, 0.56, 0.53])
    assert plots.result_spread(mauve)[1:] == (mauve["mean"], mauve["std"])
    assert plots.result_spread({"metric": "fid", "value": 40.1, "model": "e2e", "features": "f"}) == ([40.1], 40.1, 0.0)


def test_text_samples_page_escapes_every_markdown_construct(tiny_run: Run) -> None:
    from markdown_it import MarkdownIt

    tricky = [
        "a | b",
        "`code` *em* _u_ [link](http://x) ![img](y) ~~s~~",
        "<script>alert(1)</script> & co",
        "two\nlines",
        "@someone $x^2$ # not a heading \\ back",
        "ROMEO: don't, please.",
    ]
    folder = tiny_run.root / "samples" / "blocks-euler-20steps-seed0"
    folder.mkdir(parents=True)
    (folder / "samples.jsonl").write_text(
        "".join(
            json.dumps({"prompt": f"P{k}: {t}", "completion": t, "new_tokens": 7, "stopped_by": "max_new_tokens"})
            + "\n"
            for k, t in enumerate(tricky)
        )
    )
    [page] = plots.plot_samples(tiny_run)
    assert page.name == "samples.md"

    tokens = MarkdownIt("commonmark").enable("table").parse(page.read_text())
    body = tokens[[t.type for t in tokens].index("tbody_open") : [t.type for t in tokens].index("tbody_close")]
    cells = [tok.children or [] for tok in body if tok.type == "inline"]
    texts = ["".join(ch.content for ch in children if ch.type == "text") for children in cells]
    for k, t in enumerate(tricky):
        expected = t.replace("\n", "")  # the newline became <br>, an html_inline token
        assert expected in texts and f"P{k}: {expected}" in texts, (t, texts)
    kinds = {ch.type for children in cells for ch in children}
    assert kinds <= {"text", "html_inline"}, kinds  # no link, emphasis, code, image or script was opened
    assert {ch.content for children in cells for ch in children if ch.type == "html_inline"} == {"<br>"}
    assert sum(1 for tok in tokens if tok.type == "tr_open") == len(tricky) + 1  # no pipe split a row


# --- errors ----------------------------------------------------------------------------------


def test_plot_without_data_is_a_one_line_error(tiny_run: Run) -> None:
    assert_user_error(invoke("plot", "loss"), "train a block first")
    assert_user_error(invoke("plot", "eval"), "dbconvert eval")
    assert_user_error(invoke("plot", "samples"), "dbconvert sample")
    assert_user_error(invoke("plot", "curves"), "unknown figure 'curves'")
    with pytest.raises(RunError, match="train a block first"):
        plots.plot_loss(tiny_run)

    result = invoke("plot", "--run", tiny_run.root)  # `all` is the default: the partition, and notes for the rest
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(tiny_run.root / "plots" / "partition.png")]
    notes = result.stderr.splitlines()
    assert len(notes) == 3 and all(n.startswith("skipped ") for n in notes), notes


# --- TensorBoard -----------------------------------------------------------------------------


def test_tensorboard_scalars_are_the_numeric_metrics_fields() -> None:
    from dbconvert.tblog import scalars

    record = {
        "step": 4,
        "time": 1.7e9,
        "loss": 0.5,
        "lr": 1e-4,
        "world_size": 1,
        "finished": True,
        "device": "cpu",
        "nan": float("nan"),
    }
    assert scalars(record) == {"loss": 0.5, "lr": 1e-4, "world_size": 1.0}


@needs_tensorboard
def test_tensorboard_log_has_every_block_and_the_metrics_scalars(tiny_run: Run) -> None:
    train_block(tiny_run, 2, overrides=["train.tensorboard=true"], progress=False)
    train_e2e(tiny_run, steps=2, overrides=["train.tensorboard=true"], progress=False)
    records = [json.loads(x) for x in tiny_run.metrics_path("block-02").read_text().splitlines()]
    logged = {k for r in records for k, v in r.items() if isinstance(v, float | int) and k not in ("step", "time")}
    assert {p.name for p in (tiny_run.root / "tensorboard").iterdir()} == {"block-02", "e2e"}

    events = EventAccumulator(str(tiny_run.root / "tensorboard" / "block-02"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "sigma_min", "sigma_max"} <= tags and tags == logged
    assert [e.step for e in events.Scalars("loss")] == [r["step"] for r in records]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in records], rel=1e-6)


def test_tensorboard_without_the_package_is_a_one_line_error(tiny_run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it now raises ImportError
    with pytest.raises(DbconvertError, match=r'pip install "dbconvert\[tensorboard\]"'):
        train_block(tiny_run, 1, overrides=["train.tensorboard=true"], progress=False)
    assert not tiny_run.status("block-01").trained
    assert_user_error(invoke("train-block", "1", "train.tensorboard=true", "-q"), "needs the tensorboard package")


def test_short_runs_and_narrow_eval_figures_read_whole(tiny_run: Run) -> None:
    """A run of a few steps: integer step ticks from 0 and a title that says why there are few points; the eval
    figure of one result group: its long title wrapped inside the figure, never clipped (issue 33)."""
    train_block(tiny_run, 0, steps=2, progress=False)
    fig = plots.loss_figure(tiny_run)
    ax = fig.axes[0]
    assert ax.get_xlim()[0] == 0 and all(float(t).is_integer() for t in ax.get_xticks())
    assert "train.log_every=N" in fig._suptitle.get_text()

    write_result(tiny_run.root / "eval", fid_result("blocks", [31.8]))
    fig = plots.eval_figure(tiny_run)
    fig.canvas.draw()
    box, frame = fig._suptitle.get_window_extent(), fig.bbox
    assert box.x0 >= frame.x0 and box.x1 <= frame.x1, (box, frame)
