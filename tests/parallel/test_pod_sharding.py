"""Pod meshes at Llama-3-8B shapes: no array replicated across an axis that could split it.

Checked on abstract shapes (`nnx.eval_shape`: no memory) over 64-device `AbstractMesh`es. Two
layers of the 8B model stand for its 32: every layer has the same shapes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from slim_jax.models.llama import Llama, LlamaConfig
from slim_jax.nn import LoRAConfig, SlimConfig, inject
from slim_jax.parallel import AXES, tree_shardings

LLAMA3_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=2,
                        num_heads=32, num_kv_heads=8, dtype=jnp.bfloat16,
                        param_dtype=jnp.bfloat16)
TARGETS = r"(q|k|v|o|gate|up|down)_proj$"
ADAPTERS = {
    "lora": LoRAConfig(rank=16, alpha=32),
    "slim": SlimConfig(num_lora_experts=8, num_identity_experts=2, top_k=2, rank=16, alpha=32,
                       num_clusters=8),
}


def _abstract(adapter: str) -> nnx.Module:
    def make() -> nnx.Module:
        model = Llama(LLAMA3_8B, rngs=nnx.Rngs(0))
        inject(model, TARGETS, ADAPTERS[adapter], rngs=nnx.Rngs(1))
        return model

    return nnx.eval_shape(make)


@pytest.fixture(scope="module", params=sorted(ADAPTERS))
def model(request) -> nnx.Module:
    return _abstract(request.param)


def _leaves(state: nnx.State, mesh: AbstractMesh) -> list[tuple[str, tuple[int, ...], tuple]]:
    """(path, shape, PartitionSpec) of every array variable of `state` under the default rules."""
    out = []

    def record(path, var, sharding):
        if var.get_value() is not None:  # not an empty slot (a token mask between calls)
            spec = sharding.get_value().spec
            out.append((jax.tree_util.keystr(path), tuple(var.get_value().shape), spec))

    is_var = lambda x: isinstance(x, nnx.Variable)
    jax.tree_util.tree_map_with_path(record, state, tree_shardings(state, mesh), is_leaf=is_var)
    return out


def _used(spec) -> set[str]:
    return {a for axes in spec if axes for a in ((axes,) if isinstance(axes, str) else axes)}


@pytest.mark.parametrize("shape", [(1, 64, 1), (1, 16, 4), (2, 8, 4)])
def test_no_matrix_is_replicated_across_fsdp_when_it_could_be_split(model, shape):
    mesh = AbstractMesh(shape, AXES)
    # Every variable: adapters, the frozen base, SLIM's router and cluster statistics. Vectors
    # (norm scales, biases: `norm` has no mesh axis) are replicated by design and left out.
    for path, dims, spec in _leaves(nnx.state(model), mesh):
        if len(dims) < 2 or "fsdp" in _used(spec):
            continue
        # The fsdp axis is unused: then no dimension may have been able to take it.
        split = [math.prod(mesh.shape[a] for a in _used((axes,))) if axes else 1
                 for axes in (*spec, *([None] * (len(dims) - len(spec))))]
        splittable = [d for d, k in zip(dims, split, strict=True)
                      if d // k % mesh.shape["fsdp"] == 0 and d >= 64]
        assert not splittable, f"{path} {dims} {spec} is replicated across fsdp"


def test_pod_mesh_shards_every_adapter_over_all_64_chips(model):
    mesh = AbstractMesh((1, 64, 1), AXES)  # fsdp over every chip (data=1, fsdp=-1, tensor=1)
    adapters = _leaves(nnx.state(model, nnx.LoRAParam), mesh)
    assert adapters
    total = per_chip = 0
    for path, dims, spec in adapters:
        size = math.prod(dims)
        total += size
        per_chip += size // math.prod(mesh.shape[a] for a in _used(spec))
        if any(d % 64 == 0 for d in dims):
            assert _used(spec) == {"fsdp"}, f"{path} {dims} {spec} is not split over the 64 chips"
    # Everything of size divisible by 64 is split, so a chip holds 1/64 of the adapter values
    # (before: B of q/k/v/gate/up and A of o/down whole on every chip, ~64% of them).
    assert per_chip <= total / 64 * 1.01, (per_chip, total)
