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
    """

    path: str = "tinystories260k/checkpoint_v1.bin"
    dtype: str = "float32"
    param_dtype: str = "float32"
