"""dbconvert: turn residual networks into independently trained diffusion blocks."""

import logging as _logging

__version__ = "0.1.0"

# torchao (train.optimizer=adamw8bit), once installed, is imported by every `import transformers` model class and
# makes torch log two deprecation lines per process about its own enums; they mean nothing to a user and turned a
# one-line error into three. Only that logger is quietened, to errors.
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
