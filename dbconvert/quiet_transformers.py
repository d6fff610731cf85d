"""transformers' own progress bars and advisory lines, silenced around the calls dbconvert makes into it.

transformers 5 draws a bar for every `from_pretrained` ("Loading weights") and `save_pretrained` ("Writing model
shards"), on stderr, beside dbconvert's own progress and even under `-q`: the command's own output says what
was read and written, so these are switched off for the call and restored after it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bar and only its errors while the block runs."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
