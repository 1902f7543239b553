"""The variable types of slim_jax's adapters.

- `AdapterParam`: LoRA factors, expert factors and routers. A subclass of `nnx.LoRAParam`, so
  `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` and `nnx.state(model, nnx.LoRAParam)` select them.
- `ClusterState`: SLIM's cluster statistics. Not a `Param`: updated by an EMA, never trained.
- `TokenMask`: the per-call token weights a trainer hands the SLIM layers (padding = 0), or None.
"""

from __future__ import annotations

from flax import nnx


class AdapterParam(nnx.LoRAParam):
    """A trainable adapter parameter (LoRA factor, expert factor, router)."""


class ClusterState(nnx.Variable):
    """Non-trainable SLIM cluster statistics (centres, variances, update count)."""


class TokenMask(nnx.Variable):
    """Token weights `[batch, seq]` for the next cluster updates, or None (every token counts)."""
