"""The SLIM L1 penalty over a whole model's adapters (SLIM.md s4)."""

from __future__ import annotations

import jax
from flax import nnx

from slim_jax.core.penalties import slim_l1
from slim_jax.errors import ConfigError
from slim_jax.nn.variables import AdapterParam

FACTOR_PAIRS: tuple[tuple[str, str], ...] = (("lora_a", "lora_b"), ("experts_a", "experts_b"))


def adapter_l1(adapters: nnx.Module | nnx.State) -> jax.Array:
    """`sum over layers and LoRA experts of (mean|B_e| + mean|A_e|)`; routers are not penalised.

    Args:
      adapters: a model, or its adapter state (`adapter_state(model)`, e.g. inside `jax.grad`).

    Returns:
      `[]` float32.

    >>> import jax.numpy as jnp
    >>> from slim_jax.nn import LoRAConfig, LoRALinear
    >>> layer = LoRALinear(4, 2, LoRAConfig(rank=1), rngs=nnx.Rngs(0))
    >>> layer.lora_a[...] = -jnp.ones((4, 1)); layer.lora_b[...] = jnp.full((1, 2), 0.5)
    >>> adapter_l1(layer).tolist()
    1.5
    """
    state = nnx.state(adapters, AdapterParam) if isinstance(adapters, nnx.Module) else adapters
    by_layer: dict[tuple, dict[str, jax.Array]] = {}
    for path, leaf in nnx.to_flat_state(state):
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        by_layer.setdefault(tuple(path[:-1]), {})[str(path[-1])] = value
    factors = []
    for path, leaves in sorted(by_layer.items(), key=lambda kv: str(kv[0])):
        for a_name, b_name in FACTOR_PAIRS:
            if (a_name in leaves) != (b_name in leaves):
                raise ConfigError(f"adapter state at {'/'.join(map(str, path))} has only one of "
                                  f"{a_name}, {b_name}")
            if a_name in leaves:
                factors.append((leaves[a_name], leaves[b_name]))
    return slim_l1(factors)
