"""What every model family implements, so that no caller asks which family a model is.

A family (`Llama`, `T5`, or a new one) is an `nnx.Module` class with the members of `ModelFamily`;
callers (generation, PEFT conversion, training's token masks, LoRAHub, evaluation, loading) use
these and never `isinstance` or a parameter-path regex of a family (CONTRIBUTING.md). A new family
is one file: a module class implementing this protocol, and `registry.register_family` of its
Hugging Face `model_type`s so that `slim_jax.models.loading.load_model` picks it from `config.json`
(README "Adding a model family").

Layouts (`ModelFamily.layout`), the data layout a tokenizer pipeline builds for the family:
  - "causal": rows of `tokens, positions, segment_ids, targets, target_mask`;
  - "encoder_decoder": `enc_tokens, enc_segment_ids, dec_tokens, dec_segment_ids, targets,
    target_mask` (CONTRIBUTING.md, "Models").

Generation (`slim_jax.models.generate.generate`) runs every family through one decode-state shape:
`prefill(tokens, segment_ids, max_new_tokens) -> (logits [b, vocab], state)` on the padded prompts
(padded on `prompt_side`), then `decode_step(tokens [b], state) -> (logits [b, vocab], state)` per
new token; `state` is any pytree of static shape the family chooses (its KV cache and positions).

>>> from flax import nnx
>>> from slim_jax.models.llama import Llama, LlamaConfig
>>> cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
...                   num_heads=2, num_kv_heads=1)
>>> model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
>>> isinstance(model, ModelFamily), model.layout
(True, 'causal')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import jax

from slim_jax.tokenizer import Tokenizer

Layout = Literal["causal", "encoder_decoder"]
LAYOUTS: tuple[str, ...] = ("causal", "encoder_decoder")
DecodeState = Any
"""A family's decoding state: a pytree of static shape (KV cache, positions, encoder output)."""


@runtime_checkable
class ModelFamily(Protocol):
    """The interface of a model family (module docstring). `config` has `eos_ids` (tuple),
    `pad_id` (int or None) and `bos_id` (int or None)."""

    config: Any
    layout: ClassVar[Layout]
    """The batch layout the family reads ("causal" or "encoder_decoder")."""
    prompt_side: ClassVar[Literal["left", "right"]]
    """Where `generate` pads prompts: "left" for decoder-only (every prompt ends in the slot where
    generation continues), "right" for an encoder's inputs."""
    peft_task_type: ClassVar[str]
    """PEFT's `task_type` of adapters for this family ("CAUSAL_LM", "SEQ_2_SEQ_LM")."""

    @staticmethod
    def hf_name_to_path(name: str) -> tuple[str, bool]:
        """Our parameter path of a Hugging Face tensor name, and whether it is transposed."""
        ...

    @staticmethod
    def path_to_hf_name(path: str) -> str:
        """The Hugging Face tensor name of our parameter path (the inverse)."""
        ...

    def batch_logits(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Float32 logits `[b, s_target, vocab]` of a batch in the family's `layout`."""
        ...

    def mask_key(self, layer_path: str) -> str:
        """The batch key of the segment ids whose tokens the layer at `layer_path` sees (its
        token mask is `batch[key] != 0`): "segment_ids", "enc_segment_ids", "dec_segment_ids"."""
        ...

    def encode_prompt(self, tokenizer: Tokenizer, text: str) -> list[int]:
        """The token ids of a text prompt as the family expects them (BOS, or EOS for T5)."""
        ...

    def prefill(self, tokens: jax.Array, segment_ids: jax.Array, max_new_tokens: int
                ) -> tuple[jax.Array, DecodeState]:
        """Run the padded prompts `[b, p]` (segment 0 = padding); logits `[b, vocab]` of the
        first new token and a state with room for `max_new_tokens` more."""
        ...

    def decode_step(self, tokens: jax.Array, state: DecodeState
                    ) -> tuple[jax.Array, DecodeState]:
        """Feed one token per row `[b]`; logits `[b, vocab]` of the next and the new state."""
        ...


def family_members() -> tuple[str, ...]:
    """The names a family class must define (the protocol's members but `config`)."""
    return tuple(name for name in _MEMBERS if name != "config")


_MEMBERS = ("config", "layout", "prompt_side", "peft_task_type", "hf_name_to_path",
            "path_to_hf_name", "batch_logits", "mask_key", "encode_prompt", "prefill",
            "decode_step")
