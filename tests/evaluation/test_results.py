"""RUN/eval/*.json naming and the tables: every setting that decides a result keeps it apart (issue 34)."""

from __future__ import annotations

from pathlib import Path

from dbconvert.evaluation.results import compare_tables, result_name, result_table


def record(metric: str = "accuracy", **extra: object) -> dict:
    base = {
        "metric": metric,
        "model": "blocks",
        "value": 0.5,
        "features": "pixels",
        "split": "test",
        "num_samples": 10,
        "seed": 0,
        "seconds": 1.0,
        "sampler": {"steps": 3, "weights": "ema", "seed": 0},
    }
    return {**base, **extra}


def test_each_setting_that_decides_a_result_gives_it_its_own_name() -> None:
    default = record()
    assert result_name(default) == result_name(record(value=0.9, seconds=7.0))  # outcomes do not name a result
    model_weights = record(sampler={"steps": 3, "weights": "model", "seed": 0})
    assert result_name(model_weights) != result_name(default) and "model-weights" in result_name(model_weights)
    bpc = record("bpc", features="bits per character", draws_per_range=4, repeats=3, weights="ema")
    assert result_name(bpc) != result_name({**bpc, "draws_per_range": 1, "repeats": 1})
    assert result_name({**bpc, "weights": "model"}) != result_name(bpc)
    genppl = record("genppl", features="judge:judge@aaaaaa", judge={"judge": "/a/judge"}, prompt_tokens=4, new_tokens=6)
    for change in ({"judge": {"judge": "/b/judge"}}, {"prompt_tokens": 8}, {"new_tokens": 12}):
        assert result_name({**genppl, **change}) != result_name(genppl), change
    mauve = record("mauve", features="minilm", prompt_tokens=4, new_tokens=6, features_info={"path": "/x"})
    assert result_name({**mauve, "features_info": {"path": "/y"}}) != result_name(mauve)
    fid = record("fid", features="inception", repeats=1)
    assert result_name({**fid, "repeats": 3}) != result_name(fid)
    assert result_name({**fid, "reference": "folder /a (10 images)"}) != result_name(fid)


def test_a_result_on_training_data_is_flagged_in_its_table_and_in_compare() -> None:
    from rich.console import Console

    scores = {"top1": 0.5, "top5": 0.9, "nll": 1.0, "ece": 0.1}
    on_train = record(split="train", reference_overlaps_training=True, **scores)
    console = Console(width=200, record=True)
    console.print(result_table(on_train))
    for table in compare_tables([on_train, record(reference_overlaps_training=False, **scores)], Path(".")):
        console.print(table)
    text = console.export_text()
    assert "reference overlaps training" in text and "YES" in text and "train OVERLAPS TRAINING" in text
    assert "test OVERLAPS" not in text


def test_local_model_folders_of_one_name_are_labelled_apart(tmp_path: Path) -> None:
    from dbconvert.evaluation.metric import folder_label

    (tmp_path / "a" / "judge").mkdir(parents=True)
    (tmp_path / "b" / "judge").mkdir(parents=True)
    first, second = folder_label(tmp_path / "a" / "judge"), folder_label(tmp_path / "b" / "judge")
    assert first.startswith("judge@") and second.startswith("judge@") and first != second
    assert folder_label(tmp_path / "a" / "judge") == first


def test_compare_flags_rows_scored_at_different_counts_where_the_metric_moves_with_n() -> None:
    from rich.console import Console

    def mauve(n: int) -> dict:
        return record("mauve", features="minilm", num_samples=n, values=[0.5], std=0.0, prompt_tokens=4)

    console = Console(width=200, record=True)
    for table in compare_tables([mauve(320), mauve(2220)], Path(".")):
        console.print(table)
    assert "different sample counts (n = 320, 2220)" in console.export_text()
    console = Console(width=200, record=True)
    for table in compare_tables([mauve(320), {**mauve(320), "seed": 1}], Path(".")):
        console.print(table)
    assert "different sample counts" not in console.export_text()
