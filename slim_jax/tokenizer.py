"""The tokenizer interface shared by models, data and evaluation.

`slim_jax.data` takes any object of this shape, so it never depends on a model family.
Implementations: `slim_jax.models.llama2c.Llama2cTokenizer` (llama2.c's `tokenizer.bin`) and
`HFTokenizer` below (any Hugging Face tokenizer, local folder or hub id).
"""

from __future__ import annotations

import os
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


class HFTokenizer:
    """Any Hugging Face tokenizer (`transformers.AutoTokenizer`) behind the `Tokenizer` interface.

    Special tokens are added explicitly (`add_bos` / `add_eos`), never by the tokenizer's own
    post-processor, so every family behaves alike; `add_bos` does nothing for families without a
    BOS token (T5). `pad_id` is EOS when the tokenizer defines no pad token (as Llama's).

    Args:
      name_or_path: a local directory or a hub id (fetched through
        `slim_jax.hub.resolve_model_dir`, so offline runs fail with a clear error).
    """

    def __init__(self, name_or_path: str | os.PathLike[str]):
        from transformers import AutoTokenizer

        from slim_jax.errors import CheckpointError
        from slim_jax.hub import resolve_model_dir

        directory = resolve_model_dir(name_or_path, required=())
        if not any((directory / name).is_file() for name in _HF_TOKENIZER_FILES):
            raise CheckpointError(f"{directory} holds no tokenizer: expected one of "
                                  f"{', '.join(_HF_TOKENIZER_FILES)}")
        self.hf = AutoTokenizer.from_pretrained(str(directory))
        if self.hf.eos_token_id is None:
            raise CheckpointError(f"the tokenizer in {directory} defines no EOS token; generation "
                                  "and data formatting need one")
        self.vocab_size: int = len(self.hf)
        self.bos_id: int | None = self.hf.bos_token_id
        self.eos_id: int = self.hf.eos_token_id
        pad = self.hf.pad_token_id
        self.pad_id: int = pad if pad is not None else self.eos_id

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, BOS in front (when the family has one) and EOS at the end if asked.

        >>> import tempfile, transformers, tokenizers
        >>> vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3}
        >>> raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
        >>> d = tempfile.mkdtemp()
        >>> transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>",
        ...     eos_token="</s>", unk_token="<unk>").save_pretrained(d)  # doctest: +ELLIPSIS
        (...)
        >>> HFTokenizer(d).encode("hi", add_bos=True, add_eos=True)
        [1, 3, 2]
        """
        ids = list(self.hf(text, add_special_tokens=False)["input_ids"])
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return [*ids, self.eos_id] if add_eos else ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (the tokenizer's own decoding), dropping special tokens when asked."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


# Files of which a Hugging Face tokenizer directory holds at least one.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json",
                       "vocab.txt", "tokenizer_config.json")
