"""Which family loads a Hugging Face checkpoint, by its `config.json` `model_type`.

The built-in families register their model types here; a new family adds its own with
`register_family` (README "Adding a model family"), and `slim_jax.models.loading.load_model`
then loads it like the others.

>>> family_of("qwen2").__name__, family_of("mt5").__name__
('Llama', 'T5')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flax import nnx

from slim_jax.errors import ConfigError
from slim_jax.models import llama, t5
from slim_jax.models.family import LAYOUTS, family_members

_FAMILIES: dict[str, type[nnx.Module]] = {}
_BY_CONFIG: dict[type, type[nnx.Module]] = {}
_CONFIGS: dict[str, type] = {}


def register_family(model_types: Sequence[str], cls: type[nnx.Module],
                    config_type: type | None = None) -> type[nnx.Module]:
    """Load Hugging Face checkpoints whose `config.json` has one of `model_types` as `cls`.

    `cls` implements `slim_jax.models.family.ModelFamily` and the classmethod
    `from_pretrained(path, *, dtype, param_dtype, allow_pickle)`; `config_type`, the class of
    its config, lets `family_for_config` (and `abstract_model`) find it. Returns `cls`.

    Raises:
      ConfigError: `cls` lacks a member of the protocol, or a model type is taken by another
        family.
    """
    missing = [name for name in (*family_members(), "from_pretrained") if not hasattr(cls, name)]
    if missing or getattr(cls, "layout", None) not in LAYOUTS:
        raise ConfigError(f"{cls.__name__} does not implement ModelFamily: missing "
                          f"{', '.join(missing) or 'a layout in ' + str(LAYOUTS)}")
    for model_type in model_types:
        taken = _FAMILIES.get(model_type)
        if taken is not None and taken is not cls:
            raise ConfigError(f"model_type {model_type!r} is already loaded as "
                              f"{taken.__name__}; it cannot also be {cls.__name__}")
        _FAMILIES[model_type] = cls
        if config_type is not None:
            _CONFIGS[model_type] = config_type
    if config_type is not None:
        _BY_CONFIG[config_type] = cls
    return cls


def family_for_config(config: object) -> type[nnx.Module]:
    """The family class built from `config` (by the config's registered class).

    >>> family_for_config(llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
    ...                                     num_layers=1, num_heads=2, num_kv_heads=1)).__name__
    'Llama'
    """
    cls = _BY_CONFIG.get(type(config))
    if cls is None:
        raise ConfigError(f"no model family is registered for a {type(config).__name__}; "
                          f"known configs: {', '.join(sorted(t.__name__ for t in _BY_CONFIG))}")
    return cls


def family_of(model_type: str | None, *, source: str | None = None) -> type[nnx.Module]:
    """The family class registered for a Hugging Face `model_type` (read from `source`, which
    errors name).

    Raises:
      ConfigError: no family loads that model type (naming those that are supported).
    """
    if model_type not in _FAMILIES:
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}model_type {model_type!r} is not implemented; slim_jax loads "
                          f"{', '.join(model_types())}")
    return _FAMILIES[model_type]


def config_from_hf(hf_config: Mapping[str, Any], *, source: str | None = None,
                   **overrides: Any) -> Any:
    """The family config of a Hugging Face `config.json` dict, picked by its `model_type`
    (`overrides`, e.g. `dtype=`, `remat=`, win); build the model with
    `family_for_config(config)(config, rngs=...)`, or as shapes with `abstract_model(config)`.

    >>> config_from_hf({"model_type": "t5", "d_model": 16, "num_layers": 1, "num_heads": 2,
    ...                 "d_kv": 8, "d_ff": 32, "vocab_size": 32}).num_layers
    1

    Raises:
      ConfigError: no family (or no registered config class) for that model type.
    """
    model_type = hf_config.get("model_type")
    family_of(model_type, source=source)
    if model_type not in _CONFIGS:
        raise ConfigError(f"model_type {model_type!r} was registered without a config class")
    return _CONFIGS[model_type].from_hf(hf_config, **overrides)


def model_types() -> tuple[str, ...]:
    """Every registered Hugging Face `model_type`, sorted.

    >>> model_types()[:4]
    ('llama', 'mt5', 'qwen2', 't5')
    """
    return tuple(sorted(_FAMILIES))


register_family(llama.HF_MODEL_TYPES, llama.Llama, llama.LlamaConfig)
register_family(t5.HF_MODEL_TYPES, t5.T5, t5.T5Config)
