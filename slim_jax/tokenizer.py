"""The tokenizer interface shared by models, data and evaluation.

`slim_jax.data` takes any object of this shape, so it never depends on a model family. Implementations:
`slim_jax.models.llama2c.Llama2cTokenizer` (llama2.c's `tokenizer.bin`) and `HFTokenizer` below
(any Hugging Face tokenizer, local folder or hub id).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids.

    Attributes:
      vocab_size: number of token ids the model's embedding has rows for.
      bos_id: id put in front of a sequence (decoder-only models), or None when the family has none.
      eos_id: id that ends a sequence and stops generation.
      pad_id: id used to fill padded positions (never scored).
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally with BOS in front and EOS at the end."""
        ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; stops nowhere (callers cut at EOS), drops BOS/EOS/pad when asked."""
        ...
