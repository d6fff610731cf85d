"""Optional TensorBoard logging of training (`train.tensorboard=true`).

Each training target writes its own TensorBoard run, RUN/tensorboard/<block-XX | e2e>, so
`tensorboard --logdir RUN/tensorboard` shows every block and the baseline in one view. The
scalars are exactly the numeric fields of the metrics JSON line (RUN/metrics/*.jsonl stays
the record of truth; this is a view of it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dbconvert.errors import DbconvertError

NOT_SCALARS = ("step", "time")
"""Fields of a metrics record that are the x axis or the wall time, not curves."""

MISSING_PACKAGE = 'train.tensorboard=true needs the tensorboard package: pip install "dbconvert[tensorboard]"'


def require_tensorboard() -> None:
    """Fail in one line before training starts when the package is missing (on every rank alike)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise DbconvertError(MISSING_PACKAGE) from None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite fields of a metrics record, minus step and time (booleans are not numbers here)."""
    return {
        key: float(value)
        for key, value in record.items()
        if key not in NOT_SCALARS
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


class TensorBoardLog:
    """A SummaryWriter at RUN/tensorboard/<name> that takes metrics records; use it as a context manager.

    `resume_step` hides events logged past the checkpoint training resumes from (those steps are
    trained and logged again), as the metrics file is truncated to the same step.
    """

    def __init__(self, run_root: Path, name: str, resume_step: int = 0) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.directory = Path(run_root) / "tensorboard" / name
        self.writer = SummaryWriter(log_dir=str(self.directory), purge_step=resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        walltime = record.get("time")
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=step, walltime=walltime)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
