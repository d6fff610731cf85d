"""Evaluation (DESIGN 7): FID/KID through clean-fid and MAUVE through mauve-text.

- `features`: which image features FID uses: clean-fid's Inception (where it applies) or a
  small built-in CNN trained once on the data set's training split (tiny grey images, offline).
- `fid`: image folders -> features -> FID and KID, reference statistics cached per
  data set / split / features, samples generated with the run's blocks or e2e baseline.
- `mauve`: SEDD's conditional protocol (prompt of 50 tokens, continuations of 50 tokens),
  featurised by GPT-2 (mauve's default), a local Hugging Face encoder or the packaged MiniLM.
- `results`: RUN/eval/*.json and the tables of `dbconvert eval ...`.
"""

from dbconvert.evaluation.fid import evaluate_fid
from dbconvert.evaluation.mauve import evaluate_mauve
from dbconvert.evaluation.results import collect_results, write_result

__all__ = ["evaluate_fid", "evaluate_mauve", "collect_results", "write_result"]
