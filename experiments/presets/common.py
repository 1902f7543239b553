"""Config pieces every experiment command shares."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from slim_jax.errors import ConfigError
from slim_jax.models.layers import REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The base model (`experiments.base_model`: one `--model.path` convention for all commands).

    Attributes:
      path: a llama2.c checkpoint file or folder, a Hugging Face model folder (Llama family, T5 /
        FLAN-T5) or hub id; a relative path that does not exist as given is looked up in the
        data folder.
      dtype: compute dtype ("float32", "bfloat16").
      param_dtype: parameter dtype of the loaded base.
      remat: activation rematerialisation of each layer (`slim_jax.models.layers.REMAT_POLICIES`:
        "none", "full", "dots_saveable", ...).
      scan_layers: stack the layers and apply them with one scanned body (a family whose
        config has `scan_layers`: Llama and T5): compile time stops
        growing with depth.
    """

    path: str = "tinystories260k/checkpoint_v1.bin"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self) -> None:
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}",
                              field="remat")

    def config_overrides(self, fields: Collection[str] | None = None) -> dict[str, object]:
        """The model config fields this spec sets away from their defaults.

        Args:
          fields: the field names of the family's config, when known: a field set here that
            the family's config lacks is refused in one line.

        >>> ModelSpec(remat="full").config_overrides({"remat", "attention"})
        {'remat': 'full'}
        >>> ModelSpec(scan_layers=True).config_overrides({"remat"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        slim_jax.errors.ConfigError: scan_layers is not available for this model family (its ...
        """
        out: dict[str, object] = {}
        if self.remat != "none":
            out["remat"] = self.remat
        if self.scan_layers:
            out["scan_layers"] = True
        missing = sorted(set(out) - set(fields)) if fields is not None else []
        if missing:
            raise ConfigError(f"is not available for this model family (its config has no "
                              f"{missing[0]!r} field); leave it off", field=missing[0])
        return out
