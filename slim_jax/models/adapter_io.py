"""Put a saved adapter onto a loaded model: a PEFT directory or a slim_jax checkpoint, detected.

Two formats hold adapters:
  - PEFT (`adapter_config.json` + `adapter_model.safetensors`): LoRA only, read by
    `peft_io.load_peft`; what LoRAHub's published modules and `save_peft` are.
  - a slim_jax checkpoint (`slim_jax.checkpoint.Checkpointer`): a folder of step folders
    (`<run_dir>/checkpoints/<step>/`) whose item `adapters` holds the `AdapterParam` values (LoRA
    factors, SLIM experts and routers) and item `state` the other non-parameter variables (SLIM
    cluster statistics, RNG streams). Arrays alone do not say how to rebuild the layers (alpha,
    top-k, yielding, ...), so the checkpoint's JSON metadata carries the *adapter spec* under
    `ADAPTER_SPEC_KEY`: which layers carry which adapter with which config.

The adapter spec is a JSON list of groups, one per distinct adapter config, in layer order:
`[{"adapter": "lora" | "slim", "config": {LoRAConfig / SlimConfig fields}, "layers": [path, ...]}]`
(`slim_jax.nn.adapter_spec(model)` writes it, `slim_jax.nn.inject_spec(model, spec)` rebuilds the
layers).

>>> import tempfile
>>> from slim_jax.models.llama import Llama, LlamaConfig
>>> from slim_jax.nn import LoRAConfig, inject
>>> cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
...                   num_heads=2, num_kv_heads=1)
>>> trained = Llama(cfg, rngs=nnx.Rngs(0))
>>> _ = inject(trained, "q_proj", LoRAConfig(rank=2, alpha=4), rngs=nnx.Rngs(1))
>>> folder = tempfile.mkdtemp()
>>> save_adapter_checkpoint(trained, folder, step=7)
>>> find_adapter(folder).format, find_adapter(folder).step
('slim_jax', None)
>>> attach_adapter(Llama(cfg, rngs=nnx.Rngs(0)), folder)
['layers/0/self_attn/q_proj']
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from slim_jax.checkpoint import META, Checkpointer, check_finite, plain
from slim_jax.errors import CheckpointError
from slim_jax.hub import resolve_model_dir
from slim_jax.models import peft_io
from slim_jax.nn import (
    ADAPTER_SPEC_KEY,
    LoRAConfig,
    SlimConfig,
    adapted_layers,
    adapter_spec,
    inject_spec,
)
from slim_jax.nn.spec import config_json, parse_spec
from slim_jax.nn.stack import has_stacks, per_layer, per_layer_view
from slim_jax.parallel.rules import DEFAULT_RULES, Rules
from slim_jax.parallel.sharding import shard, tree_shardings
from slim_jax.paths import is_remote, local_copy

ADAPTERS_ITEM, STATE_ITEM = "adapters", "state"
"""The items of `Trainer.checkpoint_items` that inference needs (not the optimiser)."""
CHECKPOINTS_FOLDER = "checkpoints"
"""Where a training run keeps its `Checkpointer` folder inside its `run_dir`."""

_EXPECTED = ("a PEFT adapter directory (holding adapter_config.json and "
             "adapter_model.safetensors) or its hub id, or a slim_jax checkpoint directory (a "
             "Checkpointer folder of step folders such as <run_dir>/checkpoints, one of its step "
             "folders, or the run_dir holding it)")

# A hub adapter id: exactly `owner/name` (a local path of that form wins when it exists).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")

PathLike = str | os.PathLike[str]


@dataclasses.dataclass(frozen=True)
class AdapterSource:
    """Where an adapter lives and in which format (see `find_adapter`).

    Attributes:
      format: "peft" or "slim_jax".
      directory: the PEFT directory, or the `Checkpointer` folder (holding step folders).
      step: the checkpoint step to read (slim_jax only); None means the latest.
    """

    format: Literal["peft", "slim_jax"]
    directory: Path
    step: int | None = None


def _is_step_folder(path: Path) -> bool:
    """A complete `Checkpointer` step: an integer-named folder holding the JSON `meta` item."""
    return path.name.isdigit() and (path / META).is_dir()


def _has_steps(path: Path) -> bool:
    return any(_is_step_folder(child) for child in path.iterdir() if child.is_dir())


def find_adapter(path: PathLike, *, allow_pickle: bool = False) -> AdapterSource:
    """Detect the format of the adapter at `path`.

    Accepted: a PEFT directory (`adapter_config.json`); a `Checkpointer` folder (step folders
    inside: the latest step is read); one step folder of it (that step); a training run folder
    holding `checkpoints/`; a hub id `owner/name` of a PEFT adapter that is not a local path
    (fetched, or read from the Hugging Face cache when offline; `.bin` weights only with
    `allow_pickle`).

    Raises:
      CheckpointError: the path does not exist (and is no reachable hub adapter), is a file, or
        is a directory of neither format (naming what it holds and what would be accepted).

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "adapter_config.json").write_text("{}")
    >>> find_adapter(folder).format
    'peft'
    """
    if is_remote(path):  # gs://...: detected and read in its local copy (slim_jax.paths)
        path = local_copy(path)
    raw, path = str(path), Path(path).expanduser()
    if not path.exists() and _HUB_ID.match(raw):
        patterns = ("*.json", "*.safetensors", *(("*.bin",) if allow_pickle else ()))
        return AdapterSource("peft", resolve_model_dir(raw, required=(peft_io.CONFIG_FILE,),
                                                          allow_patterns=patterns))
    if not path.exists():
        raise CheckpointError(f"adapter {raw!r} does not exist; expected {_EXPECTED}")
    if not path.is_dir():
        raise CheckpointError(f"adapter {str(path)!r} is a file; expected {_EXPECTED}")
    if (path / peft_io.CONFIG_FILE).is_file():
        return AdapterSource("peft", path)
    if _is_step_folder(path):
        return AdapterSource("slim_jax", path.parent, int(path.name))
    if _has_steps(path):
        return AdapterSource("slim_jax", path)
    nested = path / CHECKPOINTS_FOLDER
    if nested.is_dir() and _has_steps(nested):
        return AdapterSource("slim_jax", nested)
    present = sorted(p.name for p in path.iterdir())[:12]
    raise CheckpointError(f"{str(path)!r} is not an adapter: expected {_EXPECTED}; it holds "
                          f"{', '.join(present) or 'nothing'}")


def attach_adapter(
    model: nnx.Module,
    path: PathLike | AdapterSource,
    *,
    allow_pickle: bool = False,
    base_model_name_or_path: str | None = None,
) -> list[str]:
    """Put the adapter at `path` (PEFT or slim_jax, detected by `find_adapter`) onto `model`.

    Args:
      model: the base model, in place (a `Llama` or `T5` for PEFT; any NNX model for slim_jax).
      path: see `find_adapter` (a local directory, or a hub id of a PEFT adapter), or what
        `find_adapter` returned.
      allow_pickle: accept a PEFT `adapter_model.bin` (a pickle can run code; off by default).
      base_model_name_or_path: PEFT only: refuse an adapter recorded for another base model.

    Returns:
      The sorted paths of the adapted layers.

    Raises:
      CheckpointError: as `find_adapter`, `peft_io.load_peft` or `load_adapter_checkpoint`.
    """
    source = (path if isinstance(path, AdapterSource)
              else find_adapter(path, allow_pickle=allow_pickle))
    if source.format == "peft":
        return peft_io.load_peft(model, source.directory, allow_pickle=allow_pickle,
                                 base_model_name_or_path=base_model_name_or_path)
    return load_adapter_checkpoint(model, source.directory, step=source.step)


# -- slim_jax checkpoints --------------------------------------------------------------------


def _inference_items(model: nnx.Module) -> dict[str, nnx.State]:
    """The model's `adapters` and `state` items, split as `Trainer.checkpoint_items` splits."""
    _, params, _, mutable = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
    return {ADAPTERS_ITEM: params, STATE_ITEM: mutable}


def save_adapter_checkpoint(
    model: nnx.Module,
    directory: PathLike,
    *,
    step: int = 0,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write the model's adapters as a slim_jax checkpoint (the layout a training run writes).

    Items `adapters` and `state` go into `<directory>/<step>/`, the adapter spec into the
    metadata, so `load_adapter_checkpoint` (and `python -m slim_jax.generate --adapter`) can
    rebuild the layers on a fresh base model.

    Args:
      model: a model with adapters (`slim_jax.nn.inject`).
      directory: the `Checkpointer` folder (created if missing).
      step: the step number of the checkpoint.
      meta: more JSON metadata to record.

    Raises:
      CheckpointError: the model has no adapters, or the step is already saved there.
    """
    spec = adapter_spec(model)
    if not spec:
        raise CheckpointError(f"the {type(model).__name__} has no adapters to save; adapt layers "
                              "first (slim_jax.nn.inject)")
    model = per_layer_view(model)  # a scanned model's adapters under per-layer names
    # A large `keep`: saving a new step must never delete the steps already in `directory`.
    with Checkpointer(directory, keep=1_000_000, async_save=False) as checkpointer:
        if not checkpointer.save(step, _inference_items(model),
                                 {**(meta or {}), ADAPTER_SPEC_KEY: spec}):
            raise CheckpointError(f"{checkpointer.directory} already holds a checkpoint at step "
                                  f"{step}; pick another step or directory")


def load_adapter_checkpoint(
    model: nnx.Module, directory: PathLike, *, step: int | None = None,
    mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
) -> list[str]:
    """Restore the adapters of a slim_jax checkpoint into `model`, in place.

    When the checkpoint records an adapter spec, a model without adapters gets them injected
    (`inject_spec`), and a model that already has adapters must have exactly those. A checkpoint
    without a spec (written before training runs recorded one) restores into a model whose
    adapters were injected by the caller as they were for training. Only the `adapters` and
    `state` items are read (not the optimiser); the mesh that wrote them does not matter.

    Args:
      model: the base model (e.g. from `Llama.from_pretrained`).
      directory: the `Checkpointer` folder.
      step: the step to read; the latest when None.
      mesh, rules: restore each adapter array straight into the sharding its `logical_axes`
        get under `rules` on `mesh` (orbax reads only each process's shards), as
        `from_pretrained(mesh=...)` places the base. None: as the model's arrays are placed.

    Returns:
      The sorted paths of the adapted layers.

    Raises:
      CheckpointError: no such folder or step; no spec and no adapters on the model; adapters
        that differ from the spec; layers the model lacks; arrays that do not fit.
    """
    if has_stacks(model):  # a scanned model: restored layer by layer, stacked again after
        with per_layer(model, frozen_abstract=True):  # the base is not copied
            paths = load_adapter_checkpoint(model, directory, step=step, mesh=mesh, rules=rules)
        if mesh is not None:  # the stacked arrays into their stacked shardings
            state = nnx.state(model, nnx.Not(_FROZEN))
            nnx.update(model, shard(state, tree_shardings(state, mesh, rules)))
        return paths
    directory = Path(directory).expanduser()
    source = str(directory)
    if not directory.is_dir() or not _has_steps(directory):
        raise CheckpointError(f"{source!r} is not a slim_jax checkpoint directory: expected a "
                              "Checkpointer folder holding step folders (e.g. "
                              "<run_dir>/checkpoints)")
    with Checkpointer(directory, async_save=False) as checkpointer:
        meta = checkpointer.restore_meta(step)
        step = int(meta["step"])
        stored = _stored_shapes(directory / str(step) / ADAPTERS_ITEM, source)
        spec = meta.get(ADAPTER_SPEC_KEY)
        present = adapter_spec(model)
        if spec is None and not present:
            layers = sorted({path.rsplit("/", 1)[0] for path in stored})
            raise CheckpointError(
                f"{source} (step {step}) does not record which adapter each layer carries "
                f"(metadata key {ADAPTER_SPEC_KEY!r}), so it can only be restored into a model "
                f"whose adapters were injected as they were for training (slim_jax.nn.inject); "
                f"it holds adapters on {len(layers)} layer(s): {', '.join(layers[:4])}"
                f"{' ...' if len(layers) > 4 else ''}")
        if spec is not None:
            wanted = parse_spec(spec, source)
            if present:
                _check_same_adapters(parse_spec(present, "the model"), wanted, source)
            else:
                inject_spec(model, spec, source=source)
        items = _inference_items(model)
        if mesh is not None:  # restore targets placed on the mesh: orbax reads into them
            items = {name: shard(item, tree_shardings(item, mesh, rules))
                     for name, item in items.items()}
        _check_fits(stored, _shapes(items[ADAPTERS_ITEM]), f"{source} (step {step})", model)
        try:
            items, _ = checkpointer.restore(items, step)
        except CheckpointError as err:
            raise CheckpointError(f"the adapter state of {source} (step {step}) does not fit "
                                  f"this {type(model).__name__}: {err}") from err
    check_finite(items, f"{source} (step {step})")  # NaN/Inf refused, naming the tensor
    nnx.update(model, items[ADAPTERS_ITEM], items[STATE_ITEM])
    return list(adapted_layers(model))


_FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
"""The frozen base's parameters (not in an adapter checkpoint)."""


def _stored_shapes(item_dir: Path, source: str) -> dict[str, tuple[int, ...]]:
    """`{array path: shape}` of a checkpoint item, read from its metadata (no array is read)."""
    if not item_dir.is_dir():
        raise CheckpointError(f"{source} has no {item_dir.name!r} item in step "
                              f"{item_dir.parent.name}; a slim_jax adapter checkpoint holds "
                              f"{ADAPTERS_ITEM!r} (and {STATE_ITEM!r})")
    metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir))
    return _shapes(getattr(metadata, "tree", metadata))


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """`{'/'-joined path: shape}` of every array leaf of `tree` (Variables unwrapped)."""
    leaves = jax.tree_util.tree_flatten_with_path(plain(tree))[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
            tuple(leaf.shape) for path, leaf in leaves}


def _check_fits(stored: Mapping[str, tuple[int, ...]], mine: Mapping[str, tuple[int, ...]],
                source: str, model: nnx.Module) -> None:
    """Name the adapter arrays the checkpoint and the model do not share, or whose shapes differ."""
    name = type(model).__name__
    extra, missing = sorted(set(stored) - set(mine)), sorted(set(mine) - set(stored))
    if extra:
        raise CheckpointError(f"{source} holds adapter arrays this {name}'s adapters lack: "
                              f"{', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
    if missing:
        raise CheckpointError(f"{source} lacks adapter arrays of this {name}: "
                              f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    for path in sorted(stored):
        if tuple(stored[path]) != tuple(mine[path]):
            raise CheckpointError(f"adapter array {path!r}: {source} has shape "
                                  f"{tuple(stored[path])}, this {name} needs {tuple(mine[path])}")


def _check_same_adapters(have: Mapping[str, Any], want: Mapping[str, Any], source: str) -> None:
    def show(config: LoRAConfig | SlimConfig) -> str:
        return f"{type(config).__name__}(rank={config.rank}, alpha={config.alpha}, ...)"

    for path in sorted(set(have) | set(want)):
        mine, theirs = have.get(path), want.get(path)
        if mine is None or theirs is None or config_json(mine) != config_json(theirs):
            raise CheckpointError(
                f"the model's adapters differ from those of {source} at layer {path!r}: the model "
                f"has {show(mine) if mine else 'none'}, the checkpoint "
                f"{show(theirs) if theirs else 'none'}; load onto a model without adapters")
