"""Checkpoints of a training run with orbax-checkpoint: asynchronous, keep-N, restorable anywhere.

A checkpoint at step `n` is a folder `<directory>/<n>/` holding named pytrees (the trainer writes
`adapters`, `state` (cluster statistics, RNG), `optimizer`) and one JSON item `meta` (step, data
position, anything small). Arrays are written shard by shard by the processes that own them, so a
checkpoint needs no gather onto one host, and are restored straight into the shardings of a target
tree: a checkpoint written on 8 devices restores onto 1, or onto another mesh shape, unchanged.

Saving is asynchronous: `save` returns once the arrays are copied off the devices, and the files
are written in the background while training goes on (`wait` blocks until they are on disk). Only
the newest `keep` checkpoints are kept; a half-written one is never listed.

>>> import tempfile, jax.numpy as jnp
>>> with tempfile.TemporaryDirectory() as d, Checkpointer(d, keep=2) as ckpt:
...     _ = ckpt.save(3, {"adapters": {"a": jnp.ones(2)}}, meta={"data_position": {"epoch": 0}})
...     items, meta = ckpt.restore({"adapters": {"a": jnp.zeros(2)}})
...     items["adapters"]["a"].tolist(), meta["step"], meta["data_position"]
([1.0, 1.0], 3, {'epoch': 0})
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from slim_jax.errors import CheckpointError

META = "meta"
"""The name of the JSON item every checkpoint carries (`step` plus the caller's metadata)."""


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def plain(tree: Any) -> Any:
    """`tree` with every `nnx.Variable` replaced by its value (what goes to disk).

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> plain({"w": nnx.Param(jnp.ones(2))})["w"].tolist()
    [1.0, 1.0]
    """
    unwrap = lambda x: x.get_value() if _is_variable(x) else x
    return jax.tree.map(unwrap, tree, is_leaf=_is_variable)


def abstract(tree: Any) -> Any:
    """`tree` as `jax.ShapeDtypeStruct`s that keep each array's sharding (a restore target).

    >>> import jax.numpy as jnp
    >>> abstract({"w": jnp.ones((2, 3))})["w"].shape
    (2, 3)
    """

    def one(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, plain(tree))


def _rewrap(target: Any, values: Any) -> Any:
    """Put restored `values` back into the `nnx.Variable`s of `target` (same structure)."""
    return jax.tree.map(
        lambda t, v: t.replace(v) if _is_variable(t) else v, target, values, is_leaf=_is_variable
    )


def nonfinite_leaves(tree: Any) -> list[str]:
    """The paths (`a/b/0/c`) of the floating-point leaves of `tree` holding a NaN or an infinity.

    Works on numpy and (sharded) JAX arrays and on `nnx.Variable`s; integer leaves are skipped.

    >>> import numpy as np
    >>> nonfinite_leaves({"w": np.ones(2), "b": {"x": np.array([1.0, np.inf])}, "i": np.arange(2)})
    ['b/x']
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(plain(tree))
    bad = []
    for path, leaf in flat:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jax.dtypes.issubdtype(dtype, jax.numpy.inexact):
            continue
        finite = np.isfinite(leaf).all() if isinstance(leaf, np.ndarray) else jax.numpy.isfinite(
            leaf).all()
        if not bool(finite):
            bad.append("/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                                for k in path))
    return bad


def check_finite(tree: Any, source: str) -> None:
    """Refuse weights with NaN or infinite values, naming the first tensor that has them.

    Raises:
      CheckpointError: some floating-point leaf of `tree` is not finite.

    >>> import numpy as np
    >>> try:
    ...     check_finite({"layer": {"kernel": np.array([np.nan])}}, "m.safetensors")
    ... except CheckpointError as err:
    ...     print(str(err).split(";")[0])
    m.safetensors holds NaN or infinite values in tensor 'layer/kernel'
    """
    bad = nonfinite_leaves(tree)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(f"{source} holds NaN or infinite values in tensor {bad[0]!r}{more}; "
                              "the file is corrupt or was written by a diverged run: use another "
                              "checkpoint")


class Checkpointer:
    """Save and restore the named pytrees of a training run, one folder per step.

    Args:
      directory: where the step folders live (a local path or a `gs://` bucket; on several hosts
        it must be storage every process sees).
      keep: how many of the newest checkpoints to keep (older ones are deleted).
      async_save: write in a background thread (True) or block in `save` (False).

    Raises:
      CheckpointError: for `keep < 1`.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, keep: int = 3, async_save: bool = True
    ) -> None:
        if keep < 1:
            raise CheckpointError(f"keep must be >= 1 (checkpoints to keep), got {keep}")
        directory = os.fspath(directory)
        # Local paths are made absolute (orbax needs it); `gs://...` and the like stay as given.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        # A checkpoint is written into `<step>.orbax-checkpoint-tmp-*` and renamed when complete,
        # so a kill in the middle of a write leaves the previous checkpoints as they were; the
        # half-written folder is never listed, and is deleted when the next manager opens.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # -- queries ------------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest step fully written, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every step with a complete checkpoint, oldest first."""
        return sorted(self._manager.all_steps())

    # -- save / restore -----------------------------------------------------------------------

    def save(
        self, step: int, items: Mapping[str, Any], meta: Mapping[str, Any] | None = None
    ) -> bool:
        """Start writing the checkpoint of `step`; returns False if that step is already saved.

        With several processes every process calls this (each writes the shards it owns).

        Args:
          step: the training step the items belong to (number of updates applied).
          items: `{name: pytree}`; arrays may be sharded, `nnx.Variable`s are stored by value.
          meta: small JSON-serialisable metadata (e.g. the data position); `step` is added.

        Raises:
          CheckpointError: when an item is named `meta` or `meta` is not JSON-serialisable.
        """
        if META in items:
            raise CheckpointError(f"item name {META!r} is reserved for the JSON metadata")
        if step in self._manager.all_steps():
            return False
        record = {**(meta or {}), "step": int(step)}
        try:  # checked here: an asynchronous save would only fail later, in the background
            json.dumps(record)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint metadata must be JSON-serialisable: {err}") from err
        # An item without arrays (a model with no mutable state) has nothing to write.
        args = {
            name: ocp.args.StandardSave(plain(tree))
            for name, tree in items.items()
            if jax.tree.leaves(tree)
        }
        args[META] = ocp.args.JsonSave(record)
        return bool(self._manager.save(step, args=ocp.args.Composite(**args), force=True))

    def restore(
        self, targets: Mapping[str, Any], step: int | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Read the items named in `targets` (a subset is fine) and the metadata of `step`.

        Args:
          targets: `{name: pytree}` of arrays or `jax.ShapeDtypeStruct`s giving the structure,
            dtypes and shardings to restore into (the mesh may differ from the one that saved);
            `nnx.Variable`s in a target come back as Variables holding the restored values.
          step: which checkpoint; the latest when None.

        Returns:
          `(items, meta)`: the restored pytrees by name, and the metadata dict (with `step`).

        Raises:
          CheckpointError: when there is no checkpoint (at `step`), or it lacks an item or does
            not fit a target's structure or shapes.
        """
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None or step not in self._manager.all_steps():
            raise CheckpointError(
                f"no checkpoint {'' if step is None else f'at step {step} '}in {self.directory}; "
                f"steps there: {self.all_steps()}"
            )
        args = {
            name: ocp.args.StandardRestore(abstract(t))
            for name, t in targets.items()
            if jax.tree.leaves(t)
        }
        args[META] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except (KeyError, ValueError, FileNotFoundError) as err:
            raise CheckpointError(
                f"checkpoint at step {step} in {self.directory} does not fit the requested items "
                f"{sorted(targets)}: {err}"
            ) from err
        items = {
            name: _rewrap(target, restored[name]) if name in args else target
            for name, target in targets.items()
        }
        return items, dict(restored[META])

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """Only the JSON metadata of `step` (the latest when None)."""
        return self.restore({}, step)[1]

    # -- lifecycle ----------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until every started save is completely on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
