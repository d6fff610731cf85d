"""MAUVE speaks for itself: faiss's k-means warning is dropped, one line says how many texts are enough (issue 14.5)."""

from __future__ import annotations

import numpy as np
import pytest


def test_faiss_warning_is_silenced_and_other_stderr_kept(capfd: pytest.CaptureFixture[str]) -> None:
    import os

    from dbconvert.evaluation.mauve import mauve_scores, quiet_faiss

    rng = np.random.default_rng(0)
    values = mauve_scores(rng.normal(size=(30, 8)), rng.normal(size=(60, 8)), [25])  # faiss: 90 points, 3 centroids
    assert 0.0 < values[0] <= 1.0
    with quiet_faiss():
        os.write(2, b"WARNING clustering 9 points to 3 centroids: please provide at least 117 training points\n")
        os.write(2, b"something else\n")
    err = capfd.readouterr().err
    assert "WARNING clustering" not in err and "something else" in err


def test_sample_size_note() -> None:
    from dbconvert.evaluation.mauve import sample_size_note

    note = sample_size_note(30, 60)
    assert note is not None and "30 reference and 60 generated texts (3 k-means clusters)" in note and "5000" in note
    assert sample_size_note(5000, 25000) is None
