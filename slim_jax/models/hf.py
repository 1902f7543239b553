"""Hugging Face checkpoints: find the directory, read its config, load its weights, fill a model.

Shared by every model family: each family's converter (`llama_hf.py`, `t5_hf.py`) maps Hugging
Face tensor names onto its own parameter paths, and everything else (which formats are safe, dtype
conversion, shape checks, sharded placement) lives here; where the files are is `slim_jax.hub`.

Safety: `.bin` / `.pt` / `.pth` checkpoints are Python pickles and can run arbitrary code when
loaded, so they are refused unless the caller passes `allow_pickle=True`; even then they are read
with `torch.load(weights_only=True)`, which unpickles tensors and plain containers only.

>>> import tempfile, numpy as np, safetensors.numpy
>>> d = Path(tempfile.mkdtemp())
>>> safetensors.numpy.save_file({"w": np.ones((2, 3), np.float32)}, str(d / "model.safetensors"))
>>> _ = (d / "config.json").write_text('{"model_type": "toy"}')
>>> read_config(d)["model_type"]
'toy'
>>> {k: (v.shape, str(v.dtype)) for k, v in load_safetensors(d, dtype="bfloat16").items()}
{'w': ((2, 3), 'bfloat16')}
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slim_jax.checkpoint import check_finite
from slim_jax.errors import CheckpointError
from slim_jax.models.lazy import lazy_safetensors
from slim_jax.nn.stack import stack_arrays
from slim_jax.parallel.rules import DEFAULT_RULES, Rules, logical_to_spec

PathLike = str | os.PathLike[str]

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
PICKLE_INDEX = "pytorch_model.bin.index.json"


def read_config(model_dir: PathLike) -> dict[str, Any]:
    """The parsed `config.json` of a model directory.

    Raises:
      CheckpointError: the file is missing or is not a JSON object.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "config.json").write_text('{"vocab_size": 8}')
    >>> read_config(d)
    {'vocab_size': 8}
    """
    path = Path(model_dir) / "config.json"
    return read_json_object(path, f"{path} does not exist: a Hugging Face model directory holds "
                                  "config.json")


def read_json_object(path: Path, missing: str) -> dict[str, Any]:
    """The JSON object in the file `path`; `missing` is the error when there is no such file.

    Raises:
      CheckpointError: no file (`missing`), invalid JSON, or JSON that is not an object.
    """
    if not path.is_file():
        raise CheckpointError(missing)
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a {type(value).__name__}; expected a JSON object")
    return value


def convert_params(arrays: Mapping[str, np.ndarray],
                   to_path: Callable[[str], tuple[str, bool]],
                   skip: Callable[[str], bool]) -> dict[str, np.ndarray]:
    """Hugging Face tensors -> `{our path: array}`: each family's name map `to_path` (name ->
    path, transposed), linear weights transposed to `[d_in, d_out]`, names `skip` says dropped.

    Raises:
      CheckpointError: a tensor to transpose that is not 2-d (named).

    >>> convert_params({"w.weight": np.ones((2, 3)), "b": np.ones(1)},
    ...                lambda n: (n.replace(".", "/"), n.endswith("weight")), lambda n: n == "b")
    {'w/weight': array([[1., 1.],
           [1., 1.],
           [1., 1.]])}
    """
    out: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if skip(name):
            continue
        path, transpose = to_path(name)
        if transpose and np.ndim(array) != 2:
            raise CheckpointError(f"tensor {name!r} should be a 2-d linear weight, got shape "
                                  f"{np.shape(array)}")
        out[path] = array.T if transpose else array
    return out


def read_eos_ids(model_dir: PathLike, config: Mapping[str, Any]) -> tuple[int, ...]:
    """Every id that ends generation: `eos_token_id` of `config` and of `generation_config.json`.

    Chat checkpoints often list their end-of-turn token only in `generation_config.json` (e.g.
    Llama 3 Instruct's 128009), so both are read; each may be an int or a list.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
    >>> read_eos_ids(d, {"eos_token_id": 2})
    (2, 7)
    """
    ids: list[int] = []
    generation = Path(model_dir) / "generation_config.json"
    sources = [config]
    if generation.is_file():
        try:
            sources.append(json.loads(generation.read_text()))
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{generation} is not valid JSON: {err}") from err
    for source in sources:
        eos = source.get("eos_token_id") if isinstance(source, Mapping) else None
        for token in eos if isinstance(eos, list) else [] if eos is None else [eos]:
            if int(token) not in ids:
                ids.append(int(token))
    return tuple(ids)


def load_safetensors(
    path: PathLike, *, dtype: Any = None, allow_pickle: bool = False, lazy: bool = False
) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint as numpy arrays, keyed by the Hugging Face tensor name.

    Args:
      path: a model directory holding `model.safetensors`, or shards listed by
        `model.safetensors.index.json`; or one `.safetensors` file.
      dtype: cast floating-point tensors to this dtype (e.g. `"bfloat16"`, `jnp.float32`); integer
        tensors keep theirs. None keeps the stored dtypes.
      allow_pickle: also accept `pytorch_model.bin` (single or sharded), `.pt` and `.pth` files,
        read with `torch.load(weights_only=True)`. Off by default: a pickle can run code.
      lazy: return safetensors tensors as `lazy.LazyTensor`s, read slice by slice when
        `assign_params` places them on a mesh (pickles are read whole either way).

    Returns:
      `{name: array}`; bf16 tensors come back as `ml_dtypes.bfloat16` numpy arrays.

    Raises:
      CheckpointError: no weights found, a shard named by the index is missing, or only pickle
        files exist and `allow_pickle` is False.
    """
    path = Path(path)
    cast = None if dtype is None else jnp.dtype(dtype)
    if path.is_file():
        arrays = _load_file(path, allow_pickle, lazy)
    elif not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: expected a model directory or a "
                              ".safetensors file")
    elif (path / SAFETENSORS_INDEX).is_file():
        arrays = _load_sharded(path, path / SAFETENSORS_INDEX, allow_pickle, lazy)
    elif (path / SAFETENSORS_FILE).is_file():
        arrays = _load_file(path / SAFETENSORS_FILE, allow_pickle, lazy)
    else:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not pickles:
            present = ", ".join(sorted(p.name for p in path.iterdir())[:20]) or "nothing"
            raise CheckpointError(f"{path} holds no weights: expected {SAFETENSORS_FILE} or "
                                  f"{SAFETENSORS_INDEX} (it holds: {present})")
        _refuse_pickle(path / pickles[0], allow_pickle)
        if (path / PICKLE_INDEX).is_file():
            arrays = _load_sharded(path, path / PICKLE_INDEX, allow_pickle)
        elif len(pickles) == 1:
            arrays = _load_file(path / pickles[0], allow_pickle)
        else:
            raise CheckpointError(f"{path} holds several pickle files ({', '.join(pickles)}) and "
                                  f"no {PICKLE_INDEX}: pass the one file to load")
    # NaN/Inf weights are refused at load, naming the tensor (lazy ones as their blocks are read)
    check_finite({k: v for k, v in arrays.items() if isinstance(v, np.ndarray)}, str(path))
    if cast is None:
        return arrays
    return {k: v.astype(cast) if jnp.issubdtype(v.dtype, jnp.floating) else v
            for k, v in arrays.items()}


def _load_sharded(directory: Path, index: Path, allow_pickle: bool, lazy: bool = False
                  ) -> dict[str, np.ndarray]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index} is not a shard index (a JSON object with a 'weight_map' "
                              f"of tensor name -> shard file): {err}") from err
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (directory / s).is_file()]
    if missing:
        raise CheckpointError(f"{index.name} names shards missing from {directory}: "
                              f"{', '.join(missing)}")
    arrays: dict[str, np.ndarray] = {}
    for shard in shards:
        arrays.update(_load_file(directory / shard, allow_pickle, lazy))
    absent = sorted(set(weight_map) - set(arrays))
    if absent:
        raise CheckpointError(f"{index.name} lists tensors its shards do not hold: "
                              f"{', '.join(absent[:10])}")
    return arrays


def _load_file(file: Path, allow_pickle: bool, lazy: bool = False) -> dict[str, np.ndarray]:
    if file.suffix == ".safetensors" and lazy:
        return lazy_safetensors(file)  # type: ignore[return-value]  (array-like, read on demand)
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="np") as f:
                return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        except SafetensorError as err:
            raise CheckpointError(f"{file} is not a readable safetensors file: {err}") from err
    if file.suffix in PICKLE_SUFFIXES:
        _refuse_pickle(file, allow_pickle)
        return _load_pickle(file)
    raise CheckpointError(f"{file}: unknown checkpoint format; expected .safetensors "
                          f"(or {', '.join(PICKLE_SUFFIXES)} with allow_pickle=True)")


def _refuse_pickle(file: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise CheckpointError(
            f"{file} is a pickle checkpoint, which can run arbitrary code when loaded; refused. "
            "Convert it to safetensors, or pass allow_pickle=True if you trust its source "
            "(it is then read with torch.load(weights_only=True))"
        )


def _load_pickle(file: Path) -> dict[str, np.ndarray]:
    import torch

    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f"{file} cannot be read by torch.load(weights_only=True): "
                              f"{err}") from err
    if not (isinstance(state, Mapping)
            and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError(f"{file} does not hold a flat state dict of tensor name -> tensor")
    return {name: _torch_to_numpy(t) for name, t in state.items()}


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits as ml_dtypes'
        return tensor.view(torch.int16).numpy().view(jnp.bfloat16)
    return tensor.numpy()


def assign_params(
    model: nnx.Module,
    arrays: Mapping[str, Any],
    *,
    strict: bool = True,
    source: str = "checkpoint",
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
) -> None:
    """Write `{path: array}` into the model's variables, in place, checking names and shapes.

    Works on a real model and on an abstract one from `nnx.eval_shape` (so a large model is never
    randomly initialised just to be overwritten). Values are cast to each variable's dtype and
    placed with its sharding when it has one. A scanned model (`slim_jax.nn.stack`) takes the
    same per-layer names: `layers/i/...` are stacked into its `layers/layer/...` variables
    (`stack_arrays`; lazily, so a mesh-aware load still reads only each device's slices).

    Args:
      model: the NNX model.
      arrays: `{"layers/0/self_attn/q_proj/kernel": array, ...}`: variable paths joined by "/",
        arrays already in the model's layout (e.g. kernels `[d_in, d_out]`).
      strict: also require every `nnx.Param` of the model (adapter parameters, `nnx.LoRAParam`,
        excepted) to be assigned.
      source: how errors name where `arrays` came from (e.g. the checkpoint directory).
      mesh: place each array straight into the sharding its `logical_axes` get under `rules`
        on this mesh, each process reading only its devices' blocks (of a `LazyTensor`: only
        those slices of the file). None: as the variable is (or on the default device).
      rules: logical-axis rules (`slim_jax.parallel.rules`) for `mesh`.

    Raises:
      CheckpointError: a path names no variable of the model, a shape differs (naming the
        parameter and both shapes), or (strict) a parameter is left unassigned.

    >>> lin = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> assign_params(lin, {"kernel": np.ones((2, 3)), "bias": np.zeros(3)})
    >>> float(lin.kernel[...].sum())
    6.0
    """
    try:
        arrays = stack_arrays(model, arrays)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from err
    variables = {"/".join(str(k) for k in path): node for path, node in nnx.iter_graph(model)
                 if isinstance(node, nnx.Variable)}
    unknown = sorted(set(arrays) - set(variables))
    if unknown:
        raise CheckpointError(
            f"{source} has {len(unknown)} tensor(s) the model has no parameter for: "
            f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''} "
            f"(model parameters look like: {', '.join(sorted(variables)[:4])} ...)"
        )
    for name, value in arrays.items():
        var = variables[name]
        if tuple(np.shape(value)) != tuple(var.shape):
            raise CheckpointError(f"parameter {name!r}: {source} has shape "
                                  f"{tuple(np.shape(value))}, the model expects {tuple(var.shape)}")
    if strict:
        missing = sorted(name for name, var in variables.items()
                         if isinstance(var, nnx.Param) and not isinstance(var, nnx.LoRAParam)
                         and name not in arrays)
        if missing:
            raise CheckpointError(f"{source} lacks {len(missing)} parameter(s) of the model: "
                                  f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    for name, value in arrays.items():
        var = variables[name]
        if mesh is not None:
            var.set_value(_place(value, var, mesh, rules, name))
            continue
        host = np.asarray(value).astype(var.dtype, copy=False)
        sharding = getattr(var.get_value(), "sharding", None)
        var.set_value(jax.device_put(host, sharding) if sharding is not None else jnp.asarray(host))


def _place(value: Any, var: nnx.Variable, mesh: Mesh, rules: Rules, name: str) -> jax.Array:
    """`value` as a global array in the sharding of `var`'s `logical_axes` (replicated without
    them), built from the blocks of this process's devices only: a `lazy.LazyTensor` reads just
    those slices of the file."""
    axes = var.get_metadata().get("logical_axes")
    spec = (PartitionSpec() if axes is None
            else logical_to_spec(axes, var.shape, mesh, rules, where=name))
    dtype = var.dtype

    def block(index: Any) -> np.ndarray:
        data = np.asarray(value[index])
        if np.issubdtype(data.dtype, np.inexact) and not np.isfinite(data).all():
            raise CheckpointError(f"{name}: the checkpoint holds NaN or infinite values; refusing "
                                  "to load it")
        return data.astype(dtype, copy=False)

    return jax.make_array_from_callback(tuple(var.shape), NamedSharding(mesh, spec), block)
