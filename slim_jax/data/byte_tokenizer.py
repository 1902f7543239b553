"""A byte-level tokenizer: the smallest complete `slim_jax.tokenizer.Tokenizer`.

Ids 0, 1, 2 are pad, BOS and EOS; byte b is id b + 3. Every text round-trips and nothing needs a
vocabulary file, which makes it the tokenizer of examples and tests of the data pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

from slim_jax.errors import DataError


class ByteTokenizer:
    """UTF-8 bytes as tokens, after three special ids (pad 0, BOS 1, EOS 2).

    >>> tok = ByteTokenizer()
    >>> tok.encode("hi", add_bos=True, add_eos=True)
    [1, 107, 108, 2]
    >>> tok.decode([1, 107, 108, 2])
    'hi'
    """

    pad_id = 0
    bos_id = 1
    eos_id = 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`: one per UTF-8 byte, optionally with BOS in front and EOS after."""
        ids = [b + self.offset for b in text.encode("utf-8")]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special ids are dropped when `skip_special_tokens`, else written `<pad>`,
        `<s>`, `</s>`. Invalid UTF-8 sequences decode to U+FFFD."""
        names = {self.pad_id: "<pad>", self.bos_id: "<s>", self.eos_id: "</s>"}
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise DataError(f"token id {i} is outside the byte vocabulary "
                                f"[0, {self.vocab_size})")
            if i >= self.offset:
                run.append(i - self.offset)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                out.append(names[i])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)
