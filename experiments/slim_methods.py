"""The methods the SLIM experiment compares: SLIM, its ablations, and LoRA of matched size.

Every method is a field change of the full SLIM config (SLIM.md s1), trained by the same trainer
with the same steps, batch and learning rate:

| method              | change                                                        |
|---------------------|---------------------------------------------------------------|
| `slim`              | none: LoRA + identity experts, top-k, yielding, dynamic merging |
| `slim_no_identity`  | `num_identity_experts=0`, `yielding=False` (a MixLoRA-like mixture) |
| `slim_no_yielding`  | `yielding=False`                                              |
| `slim_no_dropmerge` | `dropmerge_p=0` (no dynamic merging at inference)             |
| `dense_mixture`     | `dense_routing=True` (k = all: a dense soft mixture)          |
| `lora`              | plain LoRA, rank matched to SLIM's trainable parameter count  |

LoRA is matched on trainable parameters: SLIM adds per adapted layer `[d_in, d_out]`
`E_l * r * (d_in + d_out)` expert parameters plus a router of `d_in * (E_l + E_i)`; LoRA of rank
`r'` adds `r' * (d_in + d_out)`, so `r' = round(SLIM total / sum over layers of (d_in + d_out))`.
Its alpha keeps SLIM's per-expert scale (`alpha' = scale * r'`). The SLIM L1 penalty (SLIM.md s4)
is part of SLIM's loss and applies to the SLIM variants; plain LoRA trains on cross-entropy alone.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from flax import nnx

from slim_jax.errors import ConfigError
from slim_jax.nn import LoRAConfig, SlimConfig, module_path

METHODS: tuple[str, ...] = (
    "slim", "slim_no_identity", "slim_no_yielding", "slim_no_dropmerge", "dense_mixture", "lora",
)

LayerShape = tuple[int, int]  # (d_in, d_out)


@dataclasses.dataclass(frozen=True)
class Method:
    """One compared method.

    Attributes:
      name: one of `METHODS`.
      adapter: the adapter injected into every target layer.
      l1: whether the SLIM L1 penalty is part of its loss.
    """

    name: str
    adapter: SlimConfig | LoRAConfig
    l1: bool


def check_methods(names: Sequence[str]) -> None:
    """Raise `ConfigError` naming any unknown method (and the known ones)."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(map(repr, unknown))}; choose from "
                          f"{', '.join(METHODS)}")
    if not names:
        raise ConfigError(f"no method given; choose from {', '.join(METHODS)}")


def target_shapes(model: nnx.Module, pattern: str) -> list[LayerShape]:
    """`(d_in, d_out)` of every `nnx.Linear` whose path matches `pattern` (as `inject` selects).

    Raises:
      ConfigError: an invalid pattern, or one matching no linear layer.
    """
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"targets {pattern!r} is not a valid regular expression: {err}") from err
    shapes = [(m.in_features, m.out_features) for path, m in nnx.iter_modules(model)
              if type(m) is nnx.Linear and regex.search(module_path(path))]
    if not shapes:
        raise ConfigError(f"targets {pattern!r} matches no linear layer of the model")
    return shapes


def slim_parameter_count(shapes: Sequence[LayerShape], slim: SlimConfig) -> int:
    """Trainable parameters SLIM adds to layers of these shapes (experts and routers).

    >>> slim_parameter_count([(64, 64)], SlimConfig(num_lora_experts=4, num_identity_experts=2,
    ...                                               rank=4, alpha=8))
    2432
    """
    experts = sum(slim.num_lora_experts * slim.rank * (d_in + d_out) for d_in, d_out in shapes)
    routers = sum(d_in * slim.num_experts for d_in, _ in shapes) if slim.has_router else 0
    return experts + routers


def matched_lora_rank(shapes: Sequence[LayerShape], slim: SlimConfig) -> int:
    """The LoRA rank whose parameter count is nearest SLIM's on the same layers (at least 1).

    >>> matched_lora_rank([(64, 64)], SlimConfig(num_lora_experts=4, num_identity_experts=2,
    ...                                          rank=4, alpha=8))
    19
    """
    per_rank = sum(d_in + d_out for d_in, d_out in shapes)
    return max(1, round(slim_parameter_count(shapes, slim) / per_rank))


def make_method(name: str, slim: SlimConfig, shapes: Sequence[LayerShape]) -> Method:
    """The adapter of method `name`, derived from the full SLIM config `slim`.

    >>> slim = SlimConfig(num_lora_experts=4, num_identity_experts=2, rank=4, alpha=8)
    >>> make_method("slim_no_identity", slim, [(8, 8)]).adapter.num_identity_experts
    0
    >>> lora = make_method("lora", slim, [(64, 64)]).adapter
    >>> lora.rank, lora.scale == slim.scale
    (19, True)
    """
    check_methods([name])
    if name == "lora":
        rank = matched_lora_rank(shapes, slim)
        lora = LoRAConfig(rank=rank, alpha=slim.scale * rank, rslora=False, init_a=slim.init_a,
                          param_dtype=slim.param_dtype, dtype=slim.dtype)
        return Method(name, lora, l1=False)
    changes: dict[str, object] = {
        "slim": {},
        "slim_no_identity": {"num_identity_experts": 0, "yielding": False,
                             "top_k": min(slim.top_k, slim.num_lora_experts)},
        "slim_no_yielding": {"yielding": False},
        "slim_no_dropmerge": {"dropmerge_p": 0.0},
        "dense_mixture": {"dense_routing": True},
    }[name]
    return Method(name, dataclasses.replace(slim, **changes), l1=True)
