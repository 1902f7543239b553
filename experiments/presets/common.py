"""Config pieces every experiment command shares."""

from __future__ import annotations

import dataclasses


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
      scan_layers: stack the layers and apply them with one scanned body (Llama family;
        `LlamaConfig.scan_layers`): compile time stops growing with depth.
    """

    path: str = "tinystories260k/checkpoint_v1.bin"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False

    def config_overrides(self) -> dict[str, object]:
        """The model config fields this spec sets away from their defaults (a family's config
        that lacks one refuses it by name)."""
        out: dict[str, object] = {}
        if self.remat != "none":
            out["remat"] = self.remat
        if self.scan_layers:
            out["scan_layers"] = True
        return out
