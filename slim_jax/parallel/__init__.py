"""Parallelism: the device mesh, logical-axis rules, sharding of NNX state, multi-host start-up.

>>> import jax
>>> from slim_jax.parallel import MeshConfig, make_mesh
>>> mesh = make_mesh(MeshConfig(data=-1))  # every device on the data axis
>>> mesh.axis_names, mesh.shape["data"] == jax.device_count()
(('data', 'fsdp', 'tensor'), True)
"""

from slim_jax.parallel.distributed import (
    PlatformError,
    ProcessInfo,
    check_platform,
    initialize_distributed,
    leader_time,
    process_info,
)
from slim_jax.parallel.mesh import AXES, MeshConfig, MeshError, batch_parallel_size, make_mesh
from slim_jax.parallel.rules import (
    DEFAULT_RULES,
    Rules,
    ShardingRuleError,
    check_rules,
    logical_to_spec,
)
from slim_jax.parallel.sharding import (
    LOGICAL_AXES,
    BatchSizeError,
    activation_rules,
    batch_axes,
    batch_sharding,
    check_global_batch,
    constrain,
    create_sharded,
    current_rules,
    global_batch,
    mesh_context,
    model_mesh,
    shard,
    shard_module,
    tree_shardings,
)

__all__ = [
    "AXES",
    "DEFAULT_RULES",
    "LOGICAL_AXES",
    "BatchSizeError",
    "MeshConfig",
    "MeshError",
    "PlatformError",
    "ProcessInfo",
    "Rules",
    "ShardingRuleError",
    "activation_rules",
    "batch_axes",
    "batch_parallel_size",
    "batch_sharding",
    "check_global_batch",
    "check_platform",
    "check_rules",
    "constrain",
    "create_sharded",
    "current_rules",
    "global_batch",
    "initialize_distributed",
    "leader_time",
    "logical_to_spec",
    "make_mesh",
    "mesh_context",
    "model_mesh",
    "process_info",
    "shard",
    "shard_module",
    "tree_shardings",
]
