"""Deterministic, resumable batches over shuffled epochs, each process producing only its slice.

Epoch `e` visits the examples in the order `permutation(seed, e)` (numpy's PCG64 seeded with
`SeedSequence([seed, e])`, or file order without shuffling). The stream position is `(epoch,
index)`: the epoch and how many examples of its order were consumed. That pair, a small dict from
`state()`, goes into the checkpoint; `restore(state)` continues the very same stream.

A global batch is planned identically by every process from example sizes alone (which examples,
which rows, which bucket length), then each process builds only rows
`[process_index * b, (process_index + 1) * b)` with `b = global_batch_size / process_count`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from slim_jax.data.layout import Batch, Layout, TokenizedExample, bucket_shape
from slim_jax.data.packing import next_fit, row_fill
from slim_jax.errors import ConfigError, DataError

STATE_KEYS = ("epoch", "index", "seed", "num_examples")


def epoch_order(num_examples: int, seed: int, epoch: int, *, shuffle: bool = True) -> np.ndarray:
    """The visiting order of epoch `epoch`: a permutation determined by `(seed, epoch)` alone.

    >>> epoch_order(5, seed=0, epoch=0).tolist() == epoch_order(5, seed=0, epoch=0).tolist()
    True
    >>> epoch_order(4, seed=0, epoch=3, shuffle=False).tolist()
    [0, 1, 2, 3]
    """
    if not shuffle:
        return np.arange(num_examples)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(num_examples)


class BatchIterator(Iterator[Batch]):
    """Batches of this process's slice of each global batch, over shuffled epochs, resumable.

    Args:
      examples: tokenised examples (already fitted to `layout`, as `tokenize_examples` returns).
      layout: `CausalLayout` or `EncoderDecoderLayout`: row building, bucketing, truncation.
      global_batch_size: rows per global batch over all processes.
      seed: the shuffling seed.
      shuffle: reshuffle every epoch; False visits the examples in order.
      pack: put several examples in one row (next-fit, in stream order).
      drop_remainder: skip an epoch's last, incomplete batch (training: static shapes, every epoch
        reshuffled so different examples are skipped); False pads it with empty rows (evaluation:
        every example seen once; empty rows have `target_mask` 0).
      num_epochs: stop after this many epochs; None runs forever.
      process_index: this process, in `[0, process_count)` (`jax.process_index()`).
      process_count: processes feeding the global batch (`jax.process_count()`).

    Yields:
      The standard batch dict of the layout: numpy arrays `[local_batch, length]`, where
      `local_batch = global_batch_size / process_count`.

    >>> from slim_jax.data import ByteTokenizer, CausalLayout, Example, tokenize_examples
    >>> layout = CausalLayout(ByteTokenizer(), lengths=(16, 32))
    >>> data = tokenize_examples([Example(f"q{i}", "a" * i) for i in range(10)], layout)
    >>> it = BatchIterator(data, layout, global_batch_size=4, seed=1)
    >>> first = next(it); saved = it.state(); second = next(it)
    >>> it.restore(saved); bool((next(it)["tokens"] == second["tokens"]).all())
    True
    >>> saved
    {'epoch': 0, 'index': 4, 'seed': 1, 'num_examples': 10}
    """

    def __init__(
        self,
        examples: Sequence[TokenizedExample],
        layout: Layout,
        *,
        global_batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        pack: bool = False,
        drop_remainder: bool = True,
        num_epochs: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        if global_batch_size < 1:
            raise ConfigError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ConfigError(f"process_index must be in [0, process_count), got {process_index} "
                              f"of {process_count}")
        if global_batch_size % process_count:
            raise ConfigError(f"global batch of {global_batch_size} rows does not divide over "
                              f"{process_count} processes; use a multiple of {process_count}")
        if num_epochs is not None and num_epochs < 1:
            raise ConfigError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
        if not examples:
            raise DataError("no examples to batch")
        if drop_remainder and not pack and len(examples) < global_batch_size:
            raise DataError(f"{len(examples)} examples are fewer than one global batch of "
                            f"{global_batch_size} rows with drop_remainder=True: every batch would "
                            "be dropped; use a smaller batch or drop_remainder=False")
        self.examples = examples
        self.layout = layout
        self.sizes = [layout.size(e) for e in examples]
        for i, (example, size) in enumerate(zip(examples, self.sizes, strict=True)):
            if len(example.response) == 0 or any(
                    s > c for s, c in zip(size, layout.capacity, strict=True)):
                raise DataError(f"example {i} takes {size} positions (response of "
                                f"{len(example.response)} tokens), the layout allows 1 to "
                                f"{layout.capacity}: tokenise with tokenize_examples(examples, "
                                "layout), which truncates to fit")
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.seed, self.shuffle, self.pack = seed, shuffle, pack
        self.drop_remainder, self.num_epochs = drop_remainder, num_epochs
        self.process_index = process_index
        self.epoch, self.index = 0, 0
        self._order = epoch_order(len(examples), seed, 0, shuffle=shuffle)

    def state(self) -> dict[str, int]:
        """The stream position to checkpoint: `epoch`, `index`, plus `seed` and `num_examples` that
        `restore` checks so a position is never applied to other data."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "num_examples": len(self.examples)}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a position saved by `state()` (a dict, e.g. restored by orbax)."""
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise DataError(f"data position {dict(state)} lacks {missing}; expected keys "
                            f"{STATE_KEYS}")
        saved = {k: int(state[k]) for k in STATE_KEYS}
        if (saved["seed"], saved["num_examples"]) != (self.seed, len(self.examples)):
            raise DataError(f"data position was saved for seed {saved['seed']} over "
                            f"{saved['num_examples']} examples, this iterator has seed {self.seed} "
                            f"over {len(self.examples)}: not the same stream")
        if not 0 <= saved["index"] <= len(self.examples) or saved["epoch"] < 0:
            raise DataError(f"data position {saved} is out of range for {len(self.examples)} "
                            "examples")
        self.epoch, self.index = saved["epoch"], saved["index"]
        self._order = epoch_order(len(self.examples), self.seed, self.epoch, shuffle=self.shuffle)

    def __next__(self) -> Batch:
        rows = self._next_global_rows()
        ndim = len(self.layout.lengths)
        shape = bucket_shape([row_fill((self.sizes[i] for i in row), ndim) for row in rows],
                             self.layout.lengths)
        lo = self.process_index * self.local_batch_size
        local = rows[lo:lo + self.local_batch_size]
        return self.layout.build([[self.examples[i] for i in row] for row in local], shape)

    def _next_global_rows(self) -> list[list[int]]:
        """Plan the next global batch as rows of example indices; advance the position."""
        while True:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                raise StopIteration
            rest = self._order[self.index:]
            rows, full = next_fit((self.sizes[i] for i in rest), self.layout.capacity,
                                  self.global_batch_size, pack=self.pack)
            if full or (rows and not self.drop_remainder):
                self.index += sum(len(r) for r in rows)
                if self.index == len(self.examples):
                    self._start_epoch(self.epoch + 1)
                rows = [[int(rest[j]) for j in row] for row in rows]
                return rows + [[] for _ in range(self.global_batch_size - len(rows))]
            if self.index == 0:  # a whole epoch does not fill one batch: it would loop forever
                raise DataError(f"one epoch of {len(self.examples)} examples packs into fewer "
                                f"than {self.global_batch_size} rows: every batch would be "
                                "dropped; use a smaller batch or drop_remainder=False")
            self._start_epoch(self.epoch + 1)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.index = epoch, 0
        self._order = epoch_order(len(self.examples), self.seed, epoch, shuffle=self.shuffle)

    def batches_per_epoch(self, epoch: int = 0) -> int:
        """Global batches that epoch `epoch` yields (exact: plans it from sizes, builds nothing)."""
        order = epoch_order(len(self.examples), self.seed, epoch, shuffle=self.shuffle)
        count, index = 0, 0
        while index < len(order):
            rows, full = next_fit((self.sizes[i] for i in order[index:]), self.layout.capacity,
                                  self.global_batch_size, pack=self.pack)
            if not full and self.drop_remainder:
                break
            count += 1
            index += sum(len(r) for r in rows)
        return count
