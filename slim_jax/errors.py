"""The error family of slim_jax.

Every error that bad input can cause is raised at the boundary where the input enters, as a
`SlimJaxError` (a `ValueError`), and says what was wrong and what would be accepted, so that users
never meet a traceback from deep inside JAX or silently wrong numbers.
"""

from __future__ import annotations


class SlimJaxError(ValueError):
    """Base class of every input error raised by slim_jax."""


class ConfigError(SlimJaxError):
    """A configuration value is out of range or inconsistent with another one."""


class ShapeError(SlimJaxError):
    """Arrays or adapters do not have the shapes an operation needs."""


class DataError(SlimJaxError):
    """A data file or directory is missing, or holds records of the wrong form."""


class CheckpointError(SlimJaxError):
    """A checkpoint is missing, of an unsafe format, or does not fit the model."""
