"""Logical-axis rules: the MaxText-style first-fit mapping, fallbacks and named errors."""

from __future__ import annotations

import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from slim_jax.parallel import DEFAULT_RULES, ShardingRuleError, check_rules, logical_to_spec

MESH = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))


@pytest.mark.parametrize(
    ("axes", "shape", "spec"),
    [
        (("vocab", "embed"), (64, 32), P("tensor", "fsdp")),  # embedding table
        (("embed", "heads"), (32, 32), P("fsdp", "tensor")),  # q_proj kernel
        (("heads", "embed"), (32, 32), P("tensor", "fsdp")),  # o_proj kernel
        (("embed", "lora_rank"), (32, 4), P("fsdp", None)),  # LoRA A follows the kernel's d_in
        # expert Bs: nothing else takes fsdp, so it joins tensor on their d_out
        (("experts", "lora_rank", "mlp"), (8, 4, 64), P(None, None, ("tensor", "fsdp"))),
        (("lora_rank", "heads"), (4, 32), P(None, ("tensor", "fsdp"))),  # LoRA B of q_proj
        (("norm",), (32,), P(None)),
        (("batch", "length"), (16, 8), P(("data", "fsdp"), None)),
        ((None, "embed"), (3, 32), P(None, "fsdp")),
        (("embed", "mlp"), (32, 171), P("fsdp", None)),  # 171 is odd: replicated
        ((), (), P()),
    ],
)
def test_default_rules(axes, shape, spec):
    assert logical_to_spec(axes, shape, MESH) == spec


def test_a_mesh_axis_splits_one_dimension_and_fallbacks_apply():
    rules = (("embed", "fsdp"), ("mlp", "fsdp"), ("mlp", "tensor"))
    # "mlp" would take fsdp, which "embed" already uses: its fallback, tensor, applies.
    assert logical_to_spec(("embed", "mlp"), (8, 8), MESH, rules) == P("fsdp", "tensor")
    # "embed" finds fsdp taken; the unused tensor axis then joins "mlp", whose rules allow it.
    assert logical_to_spec(("mlp", "embed"), (8, 8), MESH, rules) == P(("fsdp", "tensor"), None)
    assert logical_to_spec(("mlp", "embed"), (2, 8), MESH, rules) == P("fsdp", None)  # 2 % 4


def test_size_one_axes_are_skipped_for_the_fallback():
    pod = AbstractMesh((1, 64, 1), ("data", "fsdp", "tensor"))  # the pod presets' mesh
    assert logical_to_spec(("lora_rank", "heads"), (16, 4096), pod) == P(None, "fsdp")
    assert logical_to_spec(("mlp", "lora_rank"), (14336, 16), pod) == P("fsdp", None)
    assert logical_to_spec(("embed", "heads"), (4096, 4096), pod) == P("fsdp", None)
    assert logical_to_spec(("batch", "length"), (64, 8), pod) == P("fsdp", None)
    # A rule naming only size-1 axes is skipped, not taken as "replicate".
    assert logical_to_spec(("heads",), (64,), pod, (("heads", "tensor"), ("heads", "fsdp"))) == (
        P("fsdp")
    )


def test_unknown_logical_axis_and_bad_rules_are_named():
    with pytest.raises(ShardingRuleError, match=r"layers/0/w: logical axis 'embd' has no sharding"):
        logical_to_spec(("embd",), (8,), MESH, where="layers/0/w")
    with pytest.raises(ShardingRuleError, match=r"name 2 dimensions but the array has shape"):
        logical_to_spec(("embed", "mlp"), (8,), MESH)
    with pytest.raises(ShardingRuleError, match=r"names mesh axis 'model'"):
        check_rules((*DEFAULT_RULES, ("mlp", "model")), MESH)
    with pytest.raises(ShardingRuleError, match=r"is not a \(logical_name, mesh_axes\) pair"):
        check_rules((("mlp",),), MESH)
