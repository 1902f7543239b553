"""A tiny NNX model with Hugging Face-style projection names, for the nn tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

D = 8


class Attention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q_proj = nnx.Linear(D, D, rngs=rngs)
        self.k_proj = nnx.Linear(D, D, rngs=rngs)
        self.v_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return self.o_proj(self.q_proj(x) * jax.nn.sigmoid(self.k_proj(x)) + self.v_proj(x))


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.attn = Attention(rngs)
        self.up_proj = nnx.Linear(D, 2 * D, rngs=rngs)
        self.down_proj = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(x)
        return x + self.down_proj(jax.nn.relu(self.up_proj(x)))


class Toy(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, num_layers: int = 2):
        self.layers = nnx.List([Block(rngs) for _ in range(num_layers)])
        self.head = nnx.Linear(D, 4, rngs=rngs)

    def __call__(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


@pytest.fixture
def toy():
    """A fresh two-block toy model (seed 0)."""
    return Toy(nnx.Rngs(0))


@pytest.fixture(scope="session")
def tokens():
    """`[2, 5, D]` inputs."""
    return jax.random.normal(jax.random.key(42), (2, 5, D))


def randomize_adapters(model: nnx.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Give every adapter parameter (B included) random values, so adapters change outputs."""
    from slim_jax.nn import AdapterParam

    state = nnx.state(model, AdapterParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [scale * jax.random.normal(k, v.shape, jnp.float32).astype(v.dtype)
           for k, v in zip(keys, leaves, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, new))


@pytest.fixture(scope="session")
def randomize():
    """`randomize(model, seed=1, scale=0.3)`: random values for every adapter parameter."""
    return randomize_adapters


@pytest.fixture(scope="session")
def toy_cls():
    """The toy model class, `Toy(rngs, num_layers=2)`."""
    return Toy
