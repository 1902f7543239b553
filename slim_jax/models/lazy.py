"""Checkpoint tensors read on demand, slice by slice (safetensors `get_slice`), so that a mesh-aware
load reads on each process only the parts of each tensor its devices hold.

`LazyTensor` behaves like the NumPy array it stands for where loading needs it (`shape`, `ndim`,
`dtype`, `.T`, `.astype`, `np.asarray`, indexing with a tuple of slices) without reading it.

>>> import tempfile, safetensors.numpy
>>> path = Path(tempfile.mkdtemp()) / "w.safetensors"
>>> safetensors.numpy.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(path))
>>> w = lazy_safetensors(path)["w"]
>>> w.shape, w.T.shape, w.T[1:3, :1].tolist()
((2, 3), (3, 2), [[1.0], [2.0]])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from slim_jax.errors import CheckpointError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}


class LazyTensor:
    """One tensor of a safetensors file, read only where indexed (module docstring).

    Attributes:
      shape, dtype: of the (possibly transposed, cast) tensor this stands for.
    """

    def __init__(self, file: Path, name: str, shape: tuple[int, ...], stored: Any, *,
                 transposed: bool = False, cast: Any = None):
        self.file, self.name, self.stored = file, name, np.dtype(stored)
        self.shape = tuple(shape)
        self.transposed, self.cast = transposed, cast
        self.dtype = np.dtype(stored if cast is None else cast)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def T(self) -> LazyTensor:
        """The transpose (a 2-d view: no read)."""
        return LazyTensor(self.file, self.name, self.shape[::-1], self.stored,
                          transposed=not self.transposed, cast=self.cast)

    def astype(self, dtype: Any, copy: bool = True) -> LazyTensor:
        """Cast on read (no read now)."""
        return LazyTensor(self.file, self.name, self.shape, self.stored,
                          transposed=self.transposed, cast=dtype)

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        """Read the block `index` (a tuple of slices, as `jax.make_array_from_callback` gives)."""
        from safetensors import safe_open

        index = tuple(index) + (slice(None),) * (self.ndim - len(tuple(index)))
        stored_index = index[::-1] if self.transposed else index
        with safe_open(str(self.file), framework="np") as f:
            block = f.get_slice(self.name)[stored_index]
        block = np.asarray(block)
        if block.dtype != self.stored:  # bf16 comes back as raw 2-byte words
            block = block.view(self.stored)
        block = block.T if self.transposed else block
        return block if self.cast is None else block.astype(self.cast)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[(slice(None),) * self.ndim]
        return whole if dtype is None else whole.astype(dtype)


def lazy_safetensors(file: Path) -> dict[str, LazyTensor]:
    """Every tensor of a `.safetensors` file as a `LazyTensor` (only the header is read).

    Raises:
      CheckpointError: not a readable safetensors file, or a dtype slim_jax does not read.
    """
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(str(file), framework="np") as f:
            for name in f.keys():  # noqa: SIM118
                part = f.get_slice(name)
                kind = part.get_dtype()
                if kind not in _DTYPES:
                    raise CheckpointError(f"{file}: tensor {name!r} has dtype {kind}, which "
                                          f"slim_jax does not read ({', '.join(_DTYPES)})")
                out[name] = LazyTensor(Path(file), name, tuple(part.get_shape()), _DTYPES[kind])
    except SafetensorError as err:
        raise CheckpointError(f"{file} is not a readable safetensors file: {err}") from err
    return out
