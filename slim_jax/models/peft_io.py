"""PEFT LoRA adapters in and out of slim_jax models (T5 and Llama).

A PEFT adapter directory holds `adapter_config.json` (r, lora_alpha, use_rslora, target_modules,
...) and `adapter_model.safetensors` with, per adapted layer,
`base_model.model.<module>.lora_A.weight` `[r, d_in]` and `...lora_B.weight` `[d_out, r]`, where
`<module>` is the layer's Hugging Face module name (`encoder.block.0.layer.0.SelfAttention.q`,
`model.layers.0.self_attn.q_proj`). slim_jax's `LoRALinear` holds the same adapter transposed:
`lora_a = lora_A.weight^T` `[d_in, r]`, `lora_b = lora_B.weight^T` `[r, d_out]`, and computes the
same `y = x W + scale * (x A) B` with `scale = lora_alpha / r` (rsLoRA: `lora_alpha / sqrt(r)`).

Module names are translated by each architecture's own Hugging Face mapping (`t5.hf_name_to_path`,
`llama.hf_name_to_path` and their inverses), so there is one name mapping per architecture.

- `read_peft_config(dir)`: the adapter's settings, unsupported options refused by name.
- `same_base_model(recorded, given)`: whether an adapter's recorded base names the given model.
- `load_peft_factors(dir, model)`: `(config, {layer path: (A [d_in, r], B [r, d_out])})`, checked
  against the model (LoRAHub stacks these for its composition).
- `load_peft(model, dir)`: inject `LoRALinear` into the targeted layers and set their factors.
- `save_peft(model, dir, base_model_name_or_path=...)`: write the model's LoRA adapters so that
  `peft.PeftModel.from_pretrained` loads them.

>>> import tempfile
>>> from slim_jax.models.t5 import T5, T5Config
>>> cfg = T5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_decoder_layers=1,
...                num_heads=2)
>>> model = T5(cfg, rngs=nnx.Rngs(0))
>>> _ = inject(model, "Attention/(q|v)$", LoRAConfig(rank=2, alpha=4), rngs=nnx.Rngs(1))
>>> folder = tempfile.mkdtemp()
>>> save_peft(model, folder, base_model_name_or_path="toy-t5").target_modules
('q', 'v')
>>> config, factors = load_peft_factors(folder, T5(cfg, rngs=nnx.Rngs(0)))
>>> config.rank, factors["encoder/block/0/layer/0/SelfAttention/q"][0].shape
(2, (8, 2))
>>> load_peft(T5(cfg, rngs=nnx.Rngs(0)), folder)[:2]
['decoder/block/0/layer/0/SelfAttention/q', 'decoder/block/0/layer/0/SelfAttention/v']
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import safetensors.numpy
from flax import nnx

from slim_jax.errors import CheckpointError, ConfigError
from slim_jax.models import hf, llama, t5
from slim_jax.nn import LoRAConfig, LoRALinear, SlimLinear, adapted_layers, inject, module_path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")

# Options of PEFT's LoraConfig that change what the adapter computes, and the value meaning "off".
# Anything else set in the file is refused by name rather than silently ignored.
_OFF: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}),
    "layers_to_transform": (None, []),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "alora_invocation_tokens": (None, []),
    "use_qalora": (False, None),
    "use_bdlora": (False, None),
    "kasa_config": (None, {}),
    "monteclora_config": (None, {}),
    "arrow_config": (None, {}),
}


@dataclasses.dataclass(frozen=True)
class _Naming:
    """An architecture's Hugging Face names: parameter name -> (our path, transposed), inverse."""

    to_path: Callable[[str], tuple[str, bool]]
    to_name: Callable[[str], str]
    task_type: str

    def module_path(self, hf_module: str) -> str | None:
        """Our linear layer path of a Hugging Face module name (None: not a linear layer)."""
        path, transposed = self.to_path(hf_module + ".weight")
        return path.removesuffix("/kernel") if transposed and path.endswith("/kernel") else None

    def hf_module(self, path: str) -> str:
        """The Hugging Face module name of our linear layer path."""
        return self.to_name(path + "/kernel").removesuffix(".weight")


def _naming(model: nnx.Module) -> _Naming:
    if isinstance(model, t5.T5):
        return _Naming(t5.hf_name_to_path, t5.path_to_hf_name, "SEQ_2_SEQ_LM")
    if isinstance(model, llama.Llama):
        return _Naming(llama.hf_name_to_path, llama.path_to_hf_name, "CAUSAL_LM")
    raise ConfigError(f"PEFT adapters map onto slim_jax T5 and Llama models (their Hugging Face "
                      f"module names are known), not {type(model).__name__}")


@dataclasses.dataclass(frozen=True)
class PeftLoRAConfig:
    """The settings of a PEFT LoRA adapter that slim_jax honours.

    Attributes:
      rank: r. alpha: lora_alpha. use_rslora: scale `alpha / sqrt(r)` instead of `alpha / r`.
      target_modules: module names (a layer matches when its Hugging Face module name equals one
        or ends with "." + one), a regex that must match the whole module name, or
        "all-linear" (every linear layer but the output head), as PEFT reads them. PEFT holds
        a name list as a set (and writes it in set order), so names are kept sorted and
        de-duplicated: equal adapters have equal configs and files.
      exclude_modules: names (sorted likewise) or a regex of layers never adapted (PEFT's
        rule), or None.
      dropout: lora_dropout (used only when training further).
      base_model_name_or_path: the base model the adapter was trained on, if recorded.
      task_type: PEFT's task type ("SEQ_2_SEQ_LM", "CAUSAL_LM", ...), if recorded.
    """

    rank: int
    alpha: float
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str = ()
    exclude_modules: tuple[str, ...] | str | None = None
    dropout: float = 0.0
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", _names(self.target_modules))
        if self.exclude_modules is not None:
            object.__setattr__(self, "exclude_modules", _names(self.exclude_modules))

    @property
    def scale(self) -> float:
        """The LoRA scale: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA."""
        return self.lora_config().scale

    def lora_config(self, *, dropout: float | None = None, param_dtype: Any = "float32"
                    ) -> LoRAConfig:
        """The `slim_jax.nn.LoRAConfig` of this adapter (factors stored in `param_dtype`;
        `dropout` overrides the recorded `lora_dropout`)."""
        return LoRAConfig(rank=self.rank, alpha=self.alpha, rslora=self.use_rslora,
                          dropout=self.dropout if dropout is None else dropout,
                          param_dtype=param_dtype)

    def targets(self, hf_module: str, *, is_output_head: bool = False) -> bool:
        """Whether PEFT adapts the layer of this Hugging Face module name.

        >>> PeftLoRAConfig(rank=2, alpha=4, target_modules=("q", "v")).targets("encoder.block.0.q")
        True
        >>> PeftLoRAConfig(rank=2, alpha=4, target_modules=r".*\\.k").targets("decoder.k")
        True
        """
        if _name_matches(self.exclude_modules, hf_module):
            return False
        if self.target_modules == "all-linear":
            return not is_output_head
        return _name_matches(self.target_modules, hf_module)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], *, source: str = CONFIG_FILE) -> PeftLoRAConfig:
        """Read a parsed `adapter_config.json`.

        Raises:
          CheckpointError: not a LoRA adapter, or r / lora_alpha / target_modules missing.
          ConfigError: an option slim_jax does not implement is on (bias other than "none",
            DoRA, rank or alpha patterns, layers_to_transform, modules_to_save, ...), named.
        """
        if raw.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{source} is a {raw.get('peft_type')!r} adapter; only PEFT "
                                  "LoRA adapters (peft_type 'LORA') are supported")
        for name in ("r", "lora_alpha", "target_modules"):
            if raw.get(name) is None:
                raise CheckpointError(f"{source} lacks {name!r}, which a LoRA adapter needs")
        if raw.get("bias", "none") != "none":
            raise ConfigError(f"{source}: bias={raw['bias']!r} is not supported; only LoRA "
                              "adapters trained with bias='none' map onto slim_jax's LoRALinear")
        for name, off in _OFF.items():
            if name in raw and raw[name] not in off:
                raise ConfigError(f"{source}: {name}={raw[name]!r} is not supported by slim_jax; "
                                  f"accepted: {' or '.join(map(repr, off))}")
        r = raw["r"]
        if not isinstance(r, int) or r < 1:
            raise CheckpointError(f"{source}: r must be a positive integer, got {r!r}")
        return cls(
            rank=r, alpha=float(raw["lora_alpha"]), use_rslora=bool(raw.get("use_rslora", False)),
            target_modules=_names(raw["target_modules"]),
            exclude_modules=_names(raw["exclude_modules"]) if raw.get("exclude_modules") else None,
            dropout=float(raw.get("lora_dropout") or 0.0),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
            task_type=raw.get("task_type"))

    def to_json(self) -> dict[str, Any]:
        """The `adapter_config.json` content PEFT reads for this adapter."""
        return {
            "peft_type": "LORA", "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.rank, "use_rslora": self.use_rslora,
            "lora_alpha": int(self.alpha) if float(self.alpha).is_integer() else self.alpha,
            "lora_dropout": self.dropout, "bias": "none",
            "target_modules": (self.target_modules if isinstance(self.target_modules, str)
                               else list(self.target_modules)),
            "exclude_modules": (list(self.exclude_modules)
                                if isinstance(self.exclude_modules, tuple)
                                else self.exclude_modules),
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
            "layers_to_transform": None, "layers_pattern": None, "revision": None,
        }


def _names(value: Any) -> tuple[str, ...] | str:
    """A regex string as it is; a collection of names as a sorted tuple without duplicates.

    >>> _names(["v", "q", "v"]), _names("(q|v)")
    (('q', 'v'), '(q|v)')
    """
    return value if isinstance(value, str) else tuple(sorted({str(v) for v in value}))


def _name_matches(rule: tuple[str, ...] | str | None, name: str) -> bool:
    """PEFT's rule: a string is a regex over the whole name; a list matches a name or a suffix."""
    if not rule:
        return False
    if isinstance(rule, str):
        return re.fullmatch(rule, name) is not None
    return name in rule or any(name.endswith("." + target) for target in rule)


def read_peft_config(directory: str | os.PathLike[str]) -> PeftLoRAConfig:
    """The `PeftLoRAConfig` of a PEFT adapter directory.

    Raises:
      CheckpointError: the directory or its `adapter_config.json` is missing or not JSON.
      ConfigError: an unsupported option is on (see `PeftLoRAConfig.from_json`).
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{Path(directory)} is not a PEFT adapter directory: it has no "
                              f"{CONFIG_FILE} (a PEFT adapter holds {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE})")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}; expected a JSON object")
    return PeftLoRAConfig.from_json(raw, source=str(path))


def same_base_model(recorded: str | os.PathLike[str], given: str | os.PathLike[str]) -> bool:
    """Whether two base model names (hub ids or local directories) plausibly name one model:
    equal, or equal in their last path part (`google/flan-t5-large` ~ `/models/flan-t5-large`).

    >>> same_base_model("google/flan-t5-large", "/models/FLAN-T5-large/")
    True
    >>> same_base_model("google/flan-t5-large", "google/t5-v1_1-large")
    False
    """
    name = lambda s: str(s).rstrip("/").split("/")[-1].lower()
    return str(recorded).rstrip("/") == str(given).rstrip("/") or name(recorded) == name(given)


def _check_base(config: PeftLoRAConfig, expected: str | None, source: str) -> None:
    """Refuse an adapter recorded for another base model (`same_base_model`)."""
    recorded = config.base_model_name_or_path
    if expected is None or not recorded:
        return
    if not same_base_model(recorded, expected):
        raise CheckpointError(f"{source} was trained on base model {recorded!r}, not "
                              f"{str(expected)!r}; load it onto its own base model")


def _linear_layers(model: nnx.Module) -> dict[str, nnx.Linear]:
    """Every linear layer (plain or adapted) of the model by path."""
    return {module_path(p): m for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)}


def _load_weights(directory: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickled = directory / PICKLE_WEIGHTS_FILE
        if not pickled.is_file():
            raise CheckpointError(f"{directory} has no {WEIGHTS_FILE} (nor {PICKLE_WEIGHTS_FILE})")
        weights = pickled  # hf refuses it, naming the risk, unless allow_pickle
    return hf.load_safetensors(weights, allow_pickle=allow_pickle)


def load_peft_factors(
    directory: str | os.PathLike[str],
    model: nnx.Module,
    *,
    base_model_name_or_path: str | None = None,
    allow_pickle: bool = False,
    dtype: Any = np.float32,
) -> tuple[PeftLoRAConfig, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A PEFT adapter's LoRA factors in slim_jax's layout, keyed by the model's layer paths.

    Args:
      directory: the adapter directory.
      model: the base model (a `T5` or `Llama`, concrete or from `nnx.eval_shape`); it names
        the layers and fixes the shapes every factor must have.
      base_model_name_or_path: when given, refuse an adapter recorded for another base model.
      allow_pickle: accept `adapter_model.bin` (a pickle can run code; off by default).
      dtype: the dtype of the returned factors.

    Returns:
      `(config, {path: (A [d_in, r], B [r, d_out])})`, e.g. path
      `"encoder/block/0/layer/0/SelfAttention/q"`, one entry per targeted layer, sorted.

    Raises:
      CheckpointError: a target name that matches no linear layer of the model, weights for a
        layer the model lacks or the config does not target, a targeted layer without weights,
        a factor of the wrong shape (naming the layer and both shapes), another base model.
    """
    directory = Path(directory)
    config = read_peft_config(directory)
    source = str(directory)
    _check_base(config, base_model_name_or_path, source)
    naming = _naming(model)
    linears = _linear_layers(model)
    head = naming.module_path("lm_head")
    names = {naming.hf_module(path): path for path in linears}
    targeted = {name: path for name, path in names.items()
                if config.targets(name, is_output_head=path == head)}
    if isinstance(config.target_modules, tuple):
        unknown = [t for t in config.target_modules
                   if not any(_name_matches((t,), name) for name in names)]
        if unknown:
            leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
            raise CheckpointError(f"{source}: target_modules {unknown} match no linear layer of "
                                  f"this {type(model).__name__}; its linear layers are named "
                                  f"{leaves}")
    if not targeted:
        raise CheckpointError(f"{source}: target_modules {config.target_modules!r} match no "
                              f"linear layer of this {type(model).__name__} (e.g. "
                              f"{sorted(names)[:3]})")

    factors: dict[str, dict[str, np.ndarray]] = {}
    for key, array in _load_weights(directory, allow_pickle).items():
        match = _KEY.match(key)
        if match is None:
            raise CheckpointError(f"{source}: {key!r} is not a PEFT LoRA weight (expected "
                                  f"'{KEY_PREFIX}<module>.lora_A.weight' / '.lora_B.weight')")
        module = match["module"]
        if module not in names:
            raise CheckpointError(f"{source} holds an adapter for layer {module!r}, which this "
                                  f"{type(model).__name__} does not have (is it another "
                                  f"architecture?)")
        if module not in targeted:
            raise CheckpointError(f"{source} holds weights for {module!r}, which its "
                                  f"target_modules {config.target_modules!r} do not select")
        factors.setdefault(module, {})[match["factor"]] = array
    missing = sorted(n for n in targeted if set(factors.get(n, {})) != {"A", "B"})
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{source} lacks lora_A/lora_B weights of {len(missing)} targeted "
                              f"layer(s): {shown}")

    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    r = config.rank
    for module, pair in factors.items():
        path = targeted[module]
        layer = linears[path]
        want_a, want_b = (r, layer.in_features), (layer.out_features, r)
        if pair["A"].shape != want_a or pair["B"].shape != want_b:
            raise CheckpointError(
                f"{source}: layer {module!r} has lora_A {pair['A'].shape} and lora_B "
                f"{pair['B'].shape}; this model with r={r} needs {want_a} and {want_b}")
        out[path] = (np.asarray(pair["A"], dtype).T, np.asarray(pair["B"], dtype).T)
    return config, dict(sorted(out.items()))


def load_peft(
    model: nnx.Module,
    directory: str | os.PathLike[str],
    *,
    rngs: nnx.Rngs | None = None,
    base_model_name_or_path: str | None = None,
    allow_pickle: bool = False,
    param_dtype: Any = "float32",
    dropout: float = 0.0,
) -> list[str]:
    """Put a PEFT LoRA adapter onto `model`, in place: `LoRALinear` on every targeted layer.

    Plain `nnx.Linear` targets are replaced through `slim_jax.nn.inject`; targets that already
    are `LoRALinear` with the same rank, alpha and scaling get their factors overwritten. Layers
    the adapter does not target are left as they are.

    Args:
      model: a `T5` or `Llama`.
      directory: the PEFT adapter directory.
      rngs: for the injected layers' initialisation (overwritten) and dropout; default seed 0.
      base_model_name_or_path: when given, refuse an adapter recorded for another base model.
      allow_pickle: accept `adapter_model.bin` (a pickle: off by default).
      param_dtype: storage dtype of the adapter factors.
      dropout: adapter dropout of the injected layers. PEFT's `lora_dropout` is a training
        setting and peft switches it off in eval mode, so the default 0 computes what a peft
        model computes at inference; pass `read_peft_config(dir).dropout` to train on with it.

    Returns:
      The sorted paths of the adapted layers.

    Raises:
      CheckpointError: as `load_peft_factors`; a target that is already a `SlimLinear`, or a
        `LoRALinear` of another rank, alpha or scaling.
    """
    config, factors = load_peft_factors(directory, model, allow_pickle=allow_pickle,
                                        base_model_name_or_path=base_model_name_or_path)
    lora = config.lora_config(dropout=dropout, param_dtype=param_dtype)
    linears = _linear_layers(model)
    for path in factors:
        layer = linears[path]
        if isinstance(layer, SlimLinear):
            raise CheckpointError(f"layer {path!r} already holds a SLIM adapter; a PEFT LoRA "
                                  "adapter can only go onto a plain or LoRA linear layer")
        if isinstance(layer, LoRALinear):
            have = (layer.config.rank, layer.config.scale)
            if have != (lora.rank, lora.scale) or layer.merged:
                raise CheckpointError(
                    f"layer {path!r} already has a LoRA adapter (rank {have[0]}, scale {have[1]}"
                    f"{', merged' if layer.merged else ''}); the PEFT adapter has rank "
                    f"{lora.rank}, scale {lora.scale}: unmerge it or load onto a fresh model")
    plain = [path for path in factors if type(linears[path]) is nnx.Linear]
    if plain:
        pattern = "^(?:" + "|".join(re.escape(p) for p in plain) + ")$"
        inject(model, pattern, lora, rngs=nnx.Rngs(0) if rngs is None else rngs)
    arrays = {}
    for path, (a, b) in factors.items():
        arrays[f"{path}/lora_a"], arrays[f"{path}/lora_b"] = a, b
    hf.assign_params(model, arrays, strict=False, source=str(directory))
    return list(factors)


def save_peft(
    model: nnx.Module,
    directory: str | os.PathLike[str],
    *,
    base_model_name_or_path: str,
) -> PeftLoRAConfig:
    """Write the model's LoRA adapters as a PEFT adapter directory that peft loads.

    `target_modules` is the sorted list of the adapted layers' names (e.g. `["q", "v"]`) when it
    selects exactly the adapted layers, else a regex of their full module names (sorted too), so
    the same adapter always gives the same files. Factors are written in
    float32 (float16 stays float16).

    Args:
      model: a `T5` or `Llama` whose adapted layers are all `LoRALinear` of one rank, alpha and
        scaling (merged or not: the factors are the same).
      directory: created if missing; `adapter_config.json` and `adapter_model.safetensors` are
        (over)written.
      base_model_name_or_path: the base model the adapter belongs to (a hub id or directory),
        as `peft.PeftModel.from_pretrained` records it.

    Returns:
      The written config.

    Raises:
      CheckpointError: the model has no LoRA adapter, has SLIM adapters, or its LoRA layers
        differ in rank, alpha or scaling (named).
    """
    naming = _naming(model)
    layers = adapted_layers(model)
    slim = [p for p, layer in layers.items() if not isinstance(layer, LoRALinear)]
    if slim:
        raise CheckpointError(f"SLIM layers have no PEFT LoRA form: {', '.join(slim[:5])}")
    if not layers:
        raise CheckpointError(f"the {type(model).__name__} has no LoRA adapter to save; adapt "
                              "layers first (slim_jax.nn.inject with a LoRAConfig)")
    settings = {(lay.config.rank, lay.config.alpha, lay.config.rslora, lay.config.dropout): p
                for p, lay in layers.items()}
    if len(settings) > 1:
        raise CheckpointError("PEFT stores one rank, alpha and scaling per adapter, but the "
                              "LoRA layers differ: " + "; ".join(
                                  f"{p} (r, alpha, rslora, dropout) = {s}"
                                  for s, p in settings.items()))
    [(rank, alpha, rslora, dropout)] = list(settings)
    modules = {naming.hf_module(path): layer for path, layer in layers.items()}
    config = PeftLoRAConfig(
        rank=rank, alpha=alpha, use_rslora=rslora, dropout=dropout,
        target_modules=_target_rule(sorted(modules), _linear_layers(model), naming),
        base_model_name_or_path=str(base_model_name_or_path), task_type=naming.task_type)
    tensors = {}
    for module, layer in modules.items():
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = _to_file(layer.lora_a[...]).T
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = _to_file(layer.lora_b[...]).T
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return config


def _to_file(value: jax.Array) -> np.ndarray:
    array = np.asarray(value)
    return array if array.dtype == np.float16 else array.astype(np.float32)


def _target_rule(adapted: list[str], linears: Mapping[str, nnx.Linear], naming: _Naming
                 ) -> tuple[str, ...] | str:
    """The shortest PEFT `target_modules` selecting exactly the `adapted` module names."""
    leaves = tuple(sorted({name.rsplit(".", 1)[-1] for name in adapted}))
    all_names = [naming.hf_module(path) for path in linears]
    if sorted(n for n in all_names if _name_matches(leaves, n)) == adapted:
        return leaves
    return "(?:" + "|".join(re.escape(name) for name in adapted) + ")"
