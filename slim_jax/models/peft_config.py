"""The settings of a PEFT LoRA adapter (`adapter_config.json`): read, checked, written.

Options slim_jax does not implement are refused by name rather than silently ignored.

>>> PeftLoRAConfig(rank=4, alpha=8, target_modules=["v", "q", "v"]).target_modules
('q', 'v')
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slim_jax.errors import CheckpointError, ConfigError
from slim_jax.models.hf import read_json_object
from slim_jax.nn import LoRAConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# Options of PEFT's LoraConfig that change what the adapter computes, and the value meaning "off".
# Anything else set in the file is refused by name rather than silently ignored.
_OFF: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}),
    "layers_to_transform": (None, []),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "alora_invocation_tokens": (None, []),
    "use_qalora": (False, None),
    "use_bdlora": (False, None),
    "kasa_config": (None, {}),
    "monteclora_config": (None, {}),
    "arrow_config": (None, {}),
}


@dataclasses.dataclass(frozen=True)
class PeftLoRAConfig:
    """The settings of a PEFT LoRA adapter that slim_jax honours.

    Attributes:
      rank: r. alpha: lora_alpha. use_rslora: scale `alpha / sqrt(r)` instead of `alpha / r`.
      target_modules: module names (a layer matches when its Hugging Face module name equals one
        or ends with "." + one), a regex that must match the whole module name, or
        "all-linear" (every linear layer but the output head), as PEFT reads them. PEFT holds
        a name list as a set (and writes it in set order), so names are kept sorted and
        de-duplicated: equal adapters have equal configs and files.
      exclude_modules: names (sorted likewise) or a regex of layers never adapted (PEFT's
        rule), or None.
      dropout: lora_dropout (used only when training further).
      base_model_name_or_path: the base model the adapter was trained on, if recorded.
      task_type: PEFT's task type ("SEQ_2_SEQ_LM", "CAUSAL_LM", ...), if recorded.
    """

    rank: int
    alpha: float
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str = ()
    exclude_modules: tuple[str, ...] | str | None = None
    dropout: float = 0.0
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", _names(self.target_modules))
        if self.exclude_modules is not None:
            object.__setattr__(self, "exclude_modules", _names(self.exclude_modules))

    @property
    def scale(self) -> float:
        """The LoRA scale: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA."""
        return self.lora_config().scale

    def lora_config(self, *, dropout: float | None = None, param_dtype: Any = "float32"
                    ) -> LoRAConfig:
        """The `slim_jax.nn.LoRAConfig` of this adapter (factors stored in `param_dtype`;
        `dropout` overrides the recorded `lora_dropout`)."""
        return LoRAConfig(rank=self.rank, alpha=self.alpha, rslora=self.use_rslora,
                          dropout=self.dropout if dropout is None else dropout,
                          param_dtype=param_dtype)

    def targets(self, hf_module: str, *, is_output_head: bool = False) -> bool:
        """Whether PEFT adapts the layer of this Hugging Face module name.

        >>> PeftLoRAConfig(rank=2, alpha=4, target_modules=("q", "v")).targets("encoder.block.0.q")
        True
        >>> PeftLoRAConfig(rank=2, alpha=4, target_modules=r".*\\.k").targets("decoder.k")
        True
        """
        if name_matches(self.exclude_modules, hf_module):
            return False
        if self.target_modules == "all-linear":
            return not is_output_head
        return name_matches(self.target_modules, hf_module)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], *, source: str = CONFIG_FILE) -> PeftLoRAConfig:
        """Read a parsed `adapter_config.json`.

        Raises:
          CheckpointError: not a LoRA adapter, or r / lora_alpha / target_modules missing.
          ConfigError: an option slim_jax does not implement is on (bias other than "none",
            DoRA, rank or alpha patterns, layers_to_transform, modules_to_save, ...), named.
        """
        if raw.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{source} is a {raw.get('peft_type')!r} adapter; only PEFT "
                                  "LoRA adapters (peft_type 'LORA') are supported")
        for name in ("r", "lora_alpha", "target_modules"):
            if raw.get(name) is None:
                raise CheckpointError(f"{source} lacks {name!r}, which a LoRA adapter needs")
        if raw.get("bias", "none") != "none":
            raise ConfigError(f"{source}: bias={raw['bias']!r} is not supported; only LoRA "
                              "adapters trained with bias='none' map onto slim_jax's LoRALinear")
        for name, off in _OFF.items():
            if name in raw and raw[name] not in off:
                raise ConfigError(f"{source}: {name}={raw[name]!r} is not supported by slim_jax; "
                                  f"accepted: {' or '.join(map(repr, off))}")
        r = raw["r"]
        if not isinstance(r, int) or r < 1:
            raise CheckpointError(f"{source}: r must be a positive integer, got {r!r}")
        return cls(
            rank=r, alpha=float(raw["lora_alpha"]), use_rslora=bool(raw.get("use_rslora", False)),
            target_modules=_names(raw["target_modules"]),
            exclude_modules=_names(raw["exclude_modules"]) if raw.get("exclude_modules") else None,
            dropout=float(raw.get("lora_dropout") or 0.0),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
            task_type=raw.get("task_type"))

    def to_json(self) -> dict[str, Any]:
        """The `adapter_config.json` content PEFT reads for this adapter."""
        return {
            "peft_type": "LORA", "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.rank, "use_rslora": self.use_rslora,
            "lora_alpha": int(self.alpha) if float(self.alpha).is_integer() else self.alpha,
            "lora_dropout": self.dropout, "bias": "none",
            "target_modules": (self.target_modules if isinstance(self.target_modules, str)
                               else list(self.target_modules)),
            "exclude_modules": (list(self.exclude_modules)
                                if isinstance(self.exclude_modules, tuple)
                                else self.exclude_modules),
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
            "layers_to_transform": None, "layers_pattern": None, "revision": None,
        }


def _names(value: Any) -> tuple[str, ...] | str:
    """A regex string as it is; a collection of names as a sorted tuple without duplicates.

    >>> _names(["v", "q", "v"]), _names("(q|v)")
    (('q', 'v'), '(q|v)')
    """
    return value if isinstance(value, str) else tuple(sorted({str(v) for v in value}))


def name_matches(rule: tuple[str, ...] | str | None, name: str) -> bool:
    """PEFT's rule: a string is a regex over the whole name; a list matches a name or a suffix."""
    if not rule:
        return False
    if isinstance(rule, str):
        return re.fullmatch(rule, name) is not None
    return name in rule or any(name.endswith("." + target) for target in rule)


def read_peft_config(directory: str | os.PathLike[str]) -> PeftLoRAConfig:
    """The `PeftLoRAConfig` of a PEFT adapter directory.

    Raises:
      CheckpointError: the directory or its `adapter_config.json` is missing or not JSON.
      ConfigError: an unsupported option is on (see `PeftLoRAConfig.from_json`).
    """
    path = Path(directory) / CONFIG_FILE
    raw = read_json_object(path, f"{Path(directory)} is not a PEFT adapter directory: it has no "
                                 f"{CONFIG_FILE} (a PEFT adapter holds {CONFIG_FILE} and "
                                 f"{WEIGHTS_FILE})")
    return PeftLoRAConfig.from_json(raw, source=str(path))


def same_base_model(recorded: str | os.PathLike[str], given: str | os.PathLike[str]) -> bool:
    """Whether two base model names (hub ids or local directories) plausibly name one model:
    equal, or equal in their last path part (`google/flan-t5-large` ~ `/models/flan-t5-large`).

    >>> same_base_model("google/flan-t5-large", "/models/FLAN-T5-large/")
    True
    >>> same_base_model("google/flan-t5-large", "google/t5-v1_1-large")
    False
    """
    name = lambda s: str(s).rstrip("/").split("/")[-1].lower()
    return str(recorded).rstrip("/") == str(given).rstrip("/") or name(recorded) == name(given)
