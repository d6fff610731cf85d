"""The built-in feature network's cost is bounded, it reports progress and its accuracy (issue 14.4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dbconvert.schema import DataConfig


def test_capped_training_stops_on_held_out_accuracy_and_talks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dbconvert.evaluation import features

    monkeypatch.setenv("DBCONVERT_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    x = (rng.integers(0, 60, (200, 8, 8)) + 150 * y[:, None, None]).astype(np.uint8)  # dark vs bright: easy
    np.savez(tmp_path / "easy.npz", x=x, y=y)
    cfg = DataConfig(source=str(tmp_path / "easy.npz"), test_fraction=0.2)
    spec = features.builtin_features(cfg, max_images=50, progress=True, log=print)
    info = spec.info
    assert info["train_images"] == 50 and info["val_images"] == 16  # 10% of the 160 train-split images held out
    assert info["val_accuracy"] == 1.0 and info["test_accuracy"] == 1.0 and info["test_images"] == 40
    assert info["epochs"] < features.CNN_EPOCHS  # the stopping rule ended it, not the epoch limit
    err = capsys.readouterr().err
    assert "feature network (at most 30 epochs): done," in err and "steps/s" in err
    again = features.builtin_features(cfg, max_images=50)
    assert again.name == spec.name  # cached
    assert features.builtin_features(cfg, max_images=60).name != spec.name  # the cap is part of the network's id
