"""The error family of slim_jax.

Every error that bad input can cause is raised at the boundary where the input enters, as a
`SlimJaxError` (a `ValueError`), and says what was wrong and what would be accepted, so that users
never meet a traceback from deep inside JAX or silently wrong numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping


class SlimJaxError(ValueError):
    """Base class of every input error raised by slim_jax."""


class ConfigError(SlimJaxError):
    """A configuration value is out of range or inconsistent with another one.

    Raised by a config class about one of its own fields, it names that field: `field` is the
    dataclass field's name and `detail` what is wrong with it, and the message is the two
    together. A front end that spells fields its own way (the experiment commands' flags) writes
    `err.named(spelling)` instead of `str(err)`; library users see the field name.

    >>> err = ConfigError("must be >= 1, got 0", field="batch_size")
    >>> str(err), err.named(lambda name: "--data." + name.replace("_", "-"))
    ('batch_size must be >= 1, got 0', '--data.batch-size must be >= 1, got 0')

    Attributes:
      field: the config field at fault, or None when the error is not about one field.
      detail: the message without the field's name.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field} {message}" if field else message)
        self.field = field
        self.detail = message

    def named(self, spelling: Callable[[str], str]) -> str:
        """The message with the field named as `spelling(field)` (unchanged without a field)."""
        return f"{spelling(self.field)} {self.detail}" if self.field else str(self)


class ShapeError(SlimJaxError):
    """Arrays or adapters do not have the shapes an operation needs."""


class DataError(SlimJaxError):
    """A data file or directory is missing, or holds records of the wrong form."""


class CheckpointError(SlimJaxError):
    """A checkpoint is missing, of an unsafe format, or does not fit the model."""


def with_flags(message: str, flags: Mapping[str, str]) -> str:
    """`message` with the library's argument names (whole words) replaced by a command line's
    flags, for front ends that print library errors.

    >>> with_flags("pytorch_model.bin (with allow_pickle=True); --temperature, temperature",
    ...            {"allow_pickle=True": "--allow-pickle", "temperature": "--temperature"})
    'pytorch_model.bin (with --allow-pickle); --temperature, --temperature'
    """
    for name, flag in flags.items():  # whole words only: "--temperature" stays as it is
        message = re.sub(rf"(?<![-\w]){re.escape(name)}(?![\w])", flag, message)
    return message
