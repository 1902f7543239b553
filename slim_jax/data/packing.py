"""Which examples share a row (packing) and how long a batch's rows are (bucketing).

Pure functions of example sizes, so every process of a multi-host run computes the same plan for
the whole global batch and then materialises only its own rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from slim_jax.errors import ConfigError

Size = tuple[int, ...]  # positions an example takes in each dimension: (seq,) or (enc, dec)


def check_lengths(lengths: int | Sequence[int], name: str = "lengths") -> tuple[int, ...]:
    """Bucket lengths as a sorted tuple of distinct positive ints (an int means one bucket).

    >>> check_lengths([256, 64, 128])
    (64, 128, 256)
    """
    values = (lengths,) if isinstance(lengths, int) else tuple(lengths)
    if not values or not all(isinstance(v, int) and v > 0 for v in values):
        raise ConfigError(f"{name} must be positive ints (row lengths of the batches), "
                          f"got {lengths!r}")
    return tuple(sorted(set(values)))


def bucket_length(fill: int, lengths: Sequence[int]) -> int:
    """The smallest configured length that holds `fill` positions.

    >>> bucket_length(70, (64, 128, 256))
    128
    """
    for length in lengths:
        if length >= fill:
            return length
    raise ConfigError(f"{fill} positions do not fit the largest row length {max(lengths)}")


def next_fit(
    sizes: Iterable[Size], capacity: Size, max_rows: int, *, pack: bool
) -> tuple[list[list[int]], bool]:
    """Assign examples, in stream order, to at most `max_rows` rows.

    Without packing each example takes its own row. With packing an example joins the current row
    when it fits in every dimension, else it opens the next row (next-fit: order is kept, so the
    stream position after a batch is simply the number of examples taken). Every size must fit
    `capacity` on its own (the layouts truncate to guarantee it).

    Args:
      sizes: sizes of the examples from the current stream position on.
      capacity: the largest row, per dimension.
      max_rows: rows in the batch.
      pack: whether several examples may share a row.

    Returns:
      `(rows, full)`: rows as lists of offsets into `sizes` (together `0..taken-1`), and whether
      all `max_rows` rows were opened (else `sizes` ran out first: a remainder batch).

    >>> next_fit([(3,), (2,), (4,), (1,)], (5,), max_rows=3, pack=True)
    ([[0, 1], [2, 3]], False)
    >>> next_fit([(3,), (2,), (4,), (1,)], (5,), max_rows=1, pack=True)
    ([[0, 1]], True)
    """
    rows: list[list[int]] = []
    fill: list[int] = []
    for offset, size in enumerate(sizes):
        if any(s > c for s, c in zip(size, capacity, strict=True)):
            raise ConfigError(f"an example of size {size} exceeds the row capacity {capacity}")
        if rows and pack and all(f + s <= c for f, s, c in zip(fill, size, capacity, strict=True)):
            rows[-1].append(offset)
            fill = [f + s for f, s in zip(fill, size, strict=True)]
            continue
        if len(rows) == max_rows:
            return rows, True
        rows.append([offset])
        fill = list(size)
    return rows, len(rows) == max_rows


def row_fill(row_sizes: Iterable[Size], ndim: int) -> Size:
    """Positions used by one row in each dimension (the sum of its examples' sizes)."""
    total = [0] * ndim
    for size in row_sizes:
        total = [t + s for t, s in zip(total, size, strict=True)]
    return tuple(total)
