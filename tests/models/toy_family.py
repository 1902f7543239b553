"""A third model family in one file: a bigram language model that implements `ModelFamily`.

Next-token logits depend on the current token only: `logits = lm_head(norm(embed(token)))`. It
reuses the shared layers (`RMSNorm`, `linear`), maps Hugging Face-style names, reads a
`config.json` + safetensors folder, and registers its `model_type`, so `load_model`,
`generate`, PEFT import/export and training's token masks serve it without knowing it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from slim_jax import hub
from slim_jax.models import hf
from slim_jax.models.layers import RMSNorm, linear
from slim_jax.models.registry import register_family
from slim_jax.tokenizer import Tokenizer

MODEL_TYPE = "toy_bigram"


@dataclasses.dataclass(frozen=True)
class BigramConfig:
    vocab_size: int
    hidden_size: int
    bos_id: int | None = 1
    eos_ids: tuple[int, ...] = (2,)
    pad_id: int | None = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32


class Bigram(nnx.Module):
    """`model(tokens [b, s]) -> logits [b, s, vocab]`, each position from its own token."""

    layout: ClassVar[Literal["causal"]] = "causal"
    prompt_side: ClassVar[Literal["left"]] = "left"
    peft_task_type: ClassVar[str] = "CAUSAL_LM"

    def __init__(self, config: BigramConfig, *, rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype)
        self.embed = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs,
                               embedding_metadata={"logical_axes": ("vocab", "embed")}, **kw)
        self.norm = RMSNorm(config.hidden_size, eps=1e-6, **kw)
        self.lm_head = linear(config.hidden_size, config.vocab_size, ("embed", "vocab"),
                              std=1.0, rngs=rngs, **kw)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.lm_head(self.norm(self.embed(tokens))).astype(jnp.float32)

    # Hugging Face names: "embed.weight", "norm.weight", "lm_head.weight" ([out, in]).
    @staticmethod
    def hf_name_to_path(name: str) -> tuple[str, bool]:
        module, _ = name.rsplit(".", 1)
        leaf = {"embed": "embedding", "norm": "scale"}.get(module.split(".")[-1], "kernel")
        return f"{module.replace('.', '/')}/{leaf}", leaf == "kernel"

    @staticmethod
    def path_to_hf_name(path: str) -> str:
        return path.rsplit("/", 1)[0].replace("/", ".") + ".weight"

    def batch_logits(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        return self(batch["tokens"])

    def mask_key(self, layer_path: str) -> str:
        return "segment_ids"

    def encode_prompt(self, tokenizer: Tokenizer, text: str) -> list[int]:
        return tokenizer.encode(text, add_bos=tokenizer.bos_id is not None)

    def prefill(self, tokens: jax.Array, segment_ids: jax.Array, max_new_tokens: int
                ) -> tuple[jax.Array, jax.Array]:
        # Left-padded: the last slot holds every row's last prompt token. The state counts steps.
        return self(tokens[:, -1:])[:, 0], jnp.zeros((), jnp.int32)

    def decode_step(self, tokens: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self(tokens[:, None])[:, 0], state + 1

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], *, dtype: Any = jnp.float32,
                        param_dtype: Any = jnp.float32, allow_pickle: bool = False) -> Bigram:
        folder = hub.resolve_model_dir(name_or_path)
        raw = hf.read_config(folder)
        config = BigramConfig(vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
                              dtype=dtype, param_dtype=param_dtype)
        tensors = hf.load_safetensors(folder, dtype=param_dtype, allow_pickle=allow_pickle)
        params = {}
        for name, array in tensors.items():
            path, transposed = cls.hf_name_to_path(name)
            params[path] = array.T if transposed else array
        model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
        hf.assign_params(model, params, source=str(folder))
        return model


register_family((MODEL_TYPE,), Bigram)
