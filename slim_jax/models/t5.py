"""T5 v1.1 / FLAN-T5 (and original T5) as a Flax NNX encoder-decoder matching transformers'.

Module names mirror transformers' `T5ForConditionalGeneration`, so a parameter path reads like its
Hugging Face name: `encoder/block/0/layer/0/SelfAttention/q/kernel` is
`encoder.block.0.layer.0.SelfAttention.q.weight` (transposed: kernels are `[d_in, d_out]`), and
PEFT `target_modules` such as `q` and `v` name the same layers. `t5_hf.hf_name_to_path` is the one
place that maps the two. The config is in `t5_config.py`, the blocks in `t5_blocks.py`, the shared
layers in `layers.py`; `T5` implements `slim_jax.models.family.ModelFamily`.

T5's rules, each kept here:
- relative position buckets (bidirectional in the encoder, causal in the decoder); the bias table
  lives in the first block of each stack and is shared by its later blocks (with
  `T5Config.scan_layers` it lives on the stack, whose blocks are stacked and scanned); no other
  positions;
- no `1/sqrt(d_kv)` scaling of attention scores (transformers folds it into `q`'s initialisation);
- RMS layer norm without mean or bias, computed in float32;
- feed-forward `wo(act(x wi_0) * x wi_1)` (v1.1, gated-GELU) or `wo(relu(x wi))` (original T5);
- original T5 ties the head to the embedding and scales decoder outputs by `d_model**-0.5`;
  v1.1 / FLAN-T5 have their own `lm_head` and no scaling.

The model is deterministic (no dropout): adapters bring their own.

>>> config = T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1,
...                   num_decoder_layers=1, num_heads=2, relative_attention_num_buckets=4,
...                   relative_attention_max_distance=8)
>>> model = T5(config, rngs=nnx.Rngs(0))
>>> model(jnp.ones((2, 5), jnp.int32), jnp.zeros((2, 3), jnp.int32)).shape
(2, 3, 32)
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from slim_jax import hub
from slim_jax.errors import ShapeError
from slim_jax.models import hf, t5_hf
from slim_jax.models.t5_blocks import KV, MASKED, Caches, T5Stack, attention_mask, dense
from slim_jax.models.t5_config import T5Config
from slim_jax.parallel.rules import DEFAULT_RULES, Rules
from slim_jax.tokenizer import Tokenizer

HF_MODEL_TYPES = t5_hf.HF_MODEL_TYPES
_ENCODER_SIDE = re.compile(r"^encoder/|EncDecAttention/(k|v)$")
"""Paths of the layers that read encoder tokens."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class T5DecodeState:
    """What decoding carries between steps, with static shapes (a pytree: jit and loop friendly).

    Attributes:
      self_kv: per decoder block, keys/values of the decoded positions [b, max_length, h, d_kv]
        (`t5_blocks.Caches`: with `scan_layers` one `KV` stacked over the blocks,
        [num_decoder_layers, b, max_length, h, d_kv]).
      cross_kv: per decoder block, keys/values of the encoder output [b, s_enc, h, d_kv],
        computed once by `T5.init_decode_state` (stacked likewise).
      enc_mask: [b, s_enc] bool, True at real (non-padding) encoder tokens.
      index: [] int32, the position of the next decoder token.
    """

    self_kv: Caches
    cross_kv: Caches
    enc_mask: jax.Array
    index: jax.Array

    @property
    def max_length(self) -> int:
        """How many decoder positions the cache holds."""
        return jax.tree.leaves(self.self_kv)[0].shape[-3]


class T5(nnx.Module):
    """T5 encoder-decoder with transformers' module names (see the module docstring).

    Args:
      config: the model's shape and numerics.
      rngs: initialisation randomness (transformers' T5 initialisation scales).
    """

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.shared = nnx.Embed(config.vocab_size, config.d_model, dtype=config.dtype,
                                param_dtype=config.param_dtype, rngs=rngs,
                                embedding_init=nnx.initializers.normal(1.0),
                                embedding_metadata={"logical_axes": ("vocab", "embed")})
        self.encoder = T5Stack(config, is_decoder=False, rngs=rngs)
        self.decoder = T5Stack(config, is_decoder=True, rngs=rngs)
        self.lm_head = nnx.data(None)
        if not config.tie_word_embeddings:
            self.lm_head = dense(config.d_model, config.vocab_size, ("embed", "vocab"), config,
                                  rngs, 1.0)

    # --------------------------------------------------------------------------------- forward

    def encode(self, enc_tokens: jax.Array, enc_segment_ids: jax.Array | None = None
               ) -> jax.Array:
        """Encoder output [b, s_enc, d_model] of `enc_tokens` [b, s_enc].

        enc_segment_ids: [b, s_enc], 0 marks padding, distinct ids separate packed sequences;
        default: all tokens real, one sequence per row.
        """
        enc_segment_ids = _segments(enc_tokens, enc_segment_ids, "enc")
        return self.encoder(self.shared(enc_tokens), enc_segment_ids)

    def _logits(self, hidden: jax.Array) -> jax.Array:
        """Decoder output [b, s, d] -> float32 logits [b, s, vocab]."""
        if self.config.scale_decoder_outputs:
            hidden = hidden * self.config.d_model**-0.5  # original T5 (tied head)
        logits = self.shared.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return logits.astype(jnp.float32)

    def __call__(self, enc_tokens: jax.Array, dec_tokens: jax.Array, *,
                 enc_segment_ids: jax.Array | None = None,
                 dec_segment_ids: jax.Array | None = None) -> jax.Array:
        """Teacher-forced float32 logits [b, s_dec, vocab] of `dec_tokens` [b, s_dec] given
        `enc_tokens` [b, s_enc].

        Segment ids [b, s]: 0 marks padding; packed rows number their sequences 1, 2, ... in both,
        and decoder sequence i attends to encoder sequence i. Defaults: all real, one per row.
        """
        enc_segment_ids = _segments(enc_tokens, enc_segment_ids, "enc")
        dec_segment_ids = _segments(dec_tokens, dec_segment_ids, "dec")
        if enc_tokens.shape[0] != dec_tokens.shape[0]:
            raise ShapeError(f"enc_tokens has {enc_tokens.shape[0]} rows, dec_tokens "
                             f"{dec_tokens.shape[0]}: they must have the same batch size")
        encoded = self.encoder(self.shared(enc_tokens), enc_segment_ids)
        cross = attention_mask(dec_segment_ids, enc_segment_ids, causal=False)
        hidden = self.decoder(self.shared(dec_tokens), dec_segment_ids,
                              cross_kv=self.decoder.cross_kv(encoded),
                              cross_bias=jnp.where(cross, 0.0, MASKED))
        return self._logits(hidden)

    def batch_logits(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Logits [b, s_dec, vocab] of an encoder-decoder batch (keys of CONTRIBUTING.md).

        Reads `enc_tokens`, `enc_segment_ids`, `dec_tokens`, `dec_segment_ids`; `targets` and
        `target_mask` are for the loss.
        """
        needed = ("enc_tokens", "enc_segment_ids", "dec_tokens", "dec_segment_ids")
        missing = [k for k in needed if k not in batch]
        if missing:
            raise ShapeError(f"T5.batch_logits needs the encoder-decoder batch keys {needed}; "
                             f"missing {missing} (got {sorted(batch)})")
        return self(batch["enc_tokens"], batch["dec_tokens"],
                    enc_segment_ids=batch["enc_segment_ids"],
                    dec_segment_ids=batch["dec_segment_ids"])

    # -------------------------------------------------------------------------------- decoding

    def init_decode_state(self, encoded: jax.Array, enc_mask: jax.Array, max_length: int
                          ) -> T5DecodeState:
        """An empty cache of `max_length` decoder positions for the encoder output `encoded`
        [b, s_enc, d]; `enc_mask` [b, s_enc] is nonzero at real tokens. The cross-attention keys
        and values are computed here, once for the whole generation.
        """
        if enc_mask.shape != encoded.shape[:2]:
            raise ShapeError(f"enc_mask has shape {enc_mask.shape}; the encoder output needs "
                             f"{encoded.shape[:2]}")
        if max_length < 1:
            raise ShapeError(f"max_length must be >= 1, got {max_length}")
        c = self.config
        shape = (encoded.shape[0], max_length, c.num_heads, c.d_kv)
        if self.decoder.scanned:  # one array stacked over the blocks, scanned with them
            stacked = jnp.zeros((c.num_decoder_layers, *shape), c.dtype)
            self_kv: Caches = KV(stacked, stacked)
        else:
            empty = jnp.zeros(shape, c.dtype)
            self_kv = tuple(KV(empty, empty) for _ in range(c.num_decoder_layers))
        return T5DecodeState(
            self_kv=self_kv,
            cross_kv=self.decoder.cross_kv(encoded), enc_mask=enc_mask.astype(bool),
            index=jnp.zeros((), jnp.int32))

    def decode(self, dec_tokens: jax.Array, state: T5DecodeState
               ) -> tuple[jax.Array, T5DecodeState]:
        """Float32 logits [b, s, vocab] of `dec_tokens` [b, s] at positions `state.index` .. + s-1,
        and the state advanced by s.

        All rows share the positions (T5 decoding starts every row at the decoder start token).
        The caller keeps `state.index + s <= state.max_length` (a traced index is not checked).

        >>> cfg = T5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=8, num_layers=1,
        ...                num_decoder_layers=1, num_heads=2)
        >>> model = T5(cfg, rngs=nnx.Rngs(0))
        >>> enc, mask = jnp.array([[5, 6, 1]]), jnp.array([[1, 1, 1]])
        >>> state = model.init_decode_state(model.encode(enc, mask), mask, max_length=4)
        >>> logits, state = model.decode(jnp.array([[cfg.decoder_start_token_id]]), state)
        >>> logits.shape, int(state.index)
        ((1, 1, 16), 1)
        """
        b, s = dec_tokens.shape
        max_len = state.max_length
        if b != state.enc_mask.shape[0] or s > max_len:
            raise ShapeError(f"dec_tokens {dec_tokens.shape} do not fit a decode state of "
                             f"{state.enc_mask.shape[0]} rows and {max_len} positions")
        query_pos = state.index + jnp.arange(s)
        bias = self.decoder.position_bias(query_pos, max_len, max_len)
        # k <= q: causal, and hides the cache slots not written yet.
        causal = jnp.arange(max_len)[None, :] <= query_pos[:, None]
        self_bias = jnp.where(causal[None, None], bias, MASKED)
        cross_bias = jnp.where(state.enc_mask[:, None, None, :], 0.0, MASKED)
        x, caches = self.decoder.run(self.shared(dec_tokens), self_bias, cross_kv=state.cross_kv,
                                     cross_bias=cross_bias, caches=state.self_kv,
                                     index=state.index)
        logits = self._logits(self.decoder.final_layer_norm(x))
        return logits, dataclasses.replace(state, self_kv=caches, index=state.index + s)

    # ------------------------------------------------- the model family (slim_jax.models.family)

    layout: ClassVar[Literal["encoder_decoder"]] = "encoder_decoder"
    prompt_side: ClassVar[Literal["right"]] = "right"
    peft_task_type: ClassVar[str] = "SEQ_2_SEQ_LM"
    hf_name_to_path = staticmethod(t5_hf.hf_name_to_path)
    path_to_hf_name = staticmethod(t5_hf.path_to_hf_name)

    def mask_key(self, layer_path: str) -> str:
        """Encoder layers and the decoder's cross-attention keys/values see the encoder tokens;
        every other decoder layer the decoder tokens."""
        return "enc_segment_ids" if _ENCODER_SIDE.search(layer_path) else "dec_segment_ids"

    def encode_prompt(self, tokenizer: Tokenizer, text: str) -> list[int]:
        """The encoder input: the text's ids and EOS, as T5's tokenizer does ("" is [EOS])."""
        return tokenizer.encode(text, add_eos=True)

    def prefill(self, tokens: jax.Array, segment_ids: jax.Array, max_new_tokens: int
                ) -> tuple[jax.Array, T5DecodeState]:
        """Encode the right-padded inputs `[b, s_enc]` once, then decode the start token."""
        encoded = self.encode(tokens, segment_ids)
        # Cache positions: the start token at 0, generated tokens 1..n-1 (the n-th is never fed).
        state = self.init_decode_state(encoded, segment_ids != 0, max_new_tokens)
        start = jnp.full((tokens.shape[0], 1), self.config.decoder_start_token_id, jnp.int32)
        logits, state = self.decode(start, state)
        return logits[:, 0], state

    def decode_step(self, tokens: jax.Array, state: T5DecodeState
                    ) -> tuple[jax.Array, T5DecodeState]:
        """One decoder token per row `[b]`."""
        logits, state = self.decode(tokens[:, None], state)
        return logits[:, 0], state

    # --------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], *, dtype: Any = jnp.float32,
                        param_dtype: Any = jnp.float32, allow_pickle: bool = False,
                        mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                        **config_overrides: Any) -> T5:
        """A T5 from a Hugging Face model directory (config.json + safetensors) or hub id.

        The model is built abstractly (`nnx.eval_shape`) and filled from the checkpoint, so no
        random initialisation is spent. The head is untied when the checkpoint holds its own
        `lm_head.weight` (different from `shared.weight`), as transformers decides.

        Args:
          name_or_path: a directory, or a hub id such as `google/flan-t5-large` (online, or in
            the local hub cache).
          dtype: compute dtype; param_dtype: storage dtype the weights are cast to.
          allow_pickle: also accept `pytorch_model.bin` (a pickle can run code: off by default).
          mesh, rules: put each tensor straight into its sharding on `mesh` (its
            `logical_axes` under `rules`), reading only this process's safetensors slices.
          config_overrides: `T5Config` fields the checkpoint does not hold (`attention=...`;
            `scan_layers=True`: the blocks loaded stacked directly, from per-layer names).

        Raises:
          CheckpointError: missing files, pickle weights without `allow_pickle`, tensors that do
            not fit the config (naming the parameter).
          ConfigError: not a T5 config.
        """
        folder = hub.resolve_model_dir(name_or_path)
        config = T5Config.from_hf(hf.read_config(folder), dtype=dtype, param_dtype=param_dtype,
                                  **config_overrides)
        tensors = hf.load_safetensors(folder, dtype=param_dtype, allow_pickle=allow_pickle,
                                      lazy=mesh is not None)
        config = t5_hf.tie_as_checkpoint(config, tensors)
        model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
        hf.assign_params(model, t5_hf.params_from_hf(tensors, config), source=str(folder),
                         mesh=mesh, rules=rules)
        return model


def _segments(tokens: jax.Array, segment_ids: jax.Array | None, name: str) -> jax.Array:
    """Check `tokens` is [b, s] and `segment_ids` matches it (default: all ones)."""
    if tokens.ndim != 2:
        raise ShapeError(f"{name}_tokens must be [batch, length], got shape {tokens.shape}")
    if segment_ids is None:
        return jnp.ones(tokens.shape, jnp.int32)
    if segment_ids.shape != tokens.shape:
        raise ShapeError(f"{name}_segment_ids has shape {segment_ids.shape}; it must match "
                         f"{name}_tokens {tokens.shape}")
    return segment_ids
