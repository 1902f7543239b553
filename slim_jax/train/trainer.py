"""The `Trainer`: the model split and sharded over the mesh, the compiled step, save/restore.

>>> import numpy as np
>>> from flax import nnx
>>> from slim_jax.models.llama import Llama, LlamaConfig
>>> from slim_jax.nn import LoRAConfig, inject
>>> from slim_jax.parallel import MeshConfig
>>> model = Llama(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
...                           num_heads=2, num_kv_heads=1), rngs=nnx.Rngs(0))
>>> _ = inject(model, "q_proj|v_proj", LoRAConfig(rank=2), rngs=nnx.Rngs(1))
>>> batch = {"tokens": np.ones((2, 4), np.int32), "segment_ids": np.ones((2, 4), np.int32),
...          "targets": np.ones((2, 4), np.int32), "target_mask": np.ones((2, 4), np.float32)}
>>> trainer = Trainer(model, TrainConfig(steps=2, mesh=MeshConfig(data=1), progress=False),
...                   devices=jax.devices()[:1])
>>> result = trainer.fit(iter([batch, batch]))
>>> result.stopped, len(result.history), trainer.step
('completed', 2, 2)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slim_jax.checkpoint import Checkpointer
from slim_jax.nn import ADAPTER_SPEC_KEY, adapter_l1, adapter_spec
from slim_jax.parallel import (
    check_global_batch,
    global_batch,
    make_mesh,
    process_info,
    shard,
    tree_shardings,
)
from slim_jax.parallel.topology import peak_flops_per_device
from slim_jax.train.config import TrainConfig
from slim_jax.train.evaluation import Periodic
from slim_jax.train.forward import masked_batch_logits
from slim_jax.train.loop import TrainResult, run
from slim_jax.train.metrics import count_params, training_flops_per_token
from slim_jax.train.optimizer import learning_rate_schedule, make_optimizer
from slim_jax.train.state import (
    Filter,
    TrainState,
    cast_floating,
    merge_model,
    resolve_frozen_dtype,
    split_model,
)
from slim_jax.train.step import Forward, Penalty, StepDefinition, compile_train_step

log = logging.getLogger(__name__)
HostBatch = Mapping[str, np.ndarray]



@jax.jit
def _copy_arrays(tree: Any) -> Any:
    """Fresh buffers with the same values and shardings (never aliases of the inputs)."""
    return jax.tree.map(jnp.copy, tree)

class Trainer:
    """Adapter training of an NNX model on a device mesh.

    The model is split into trained adapters, the frozen base (cast to `config.frozen_dtype`) and
    mutable state (cluster statistics, RNG streams); all three and the optimiser state are placed
    on the mesh by their logical axes, and one jitted step (explicit in/out shardings, donated
    state; traced and run under `jax.set_mesh(mesh)`, so the model's activation constraints,
    `slim_jax.parallel.constrain`, take effect) updates them. The given model is left as it
    was; `trainer.model()` is the trained one.
    For a base larger than one device, build the model with `slim_jax.parallel.create_sharded`
    (or on the host) so that no device ever holds it whole.

    Args:
      model: a model with adapters injected (`slim_jax.nn.inject`), implementing `batch_logits`.
      config: the run.
      mesh: the device mesh; default `make_mesh(config.mesh, devices)`.
      devices: devices for the default mesh (all by default).
      wrt: filter of the trained variables (`nnx.LoRAParam` covers every `AdapterParam`).
      forward: `(model, batch) -> logits`; default `masked_batch_logits`.
      penalty: the adapter penalty weighted by `config.l1_coeff`; default `adapter_l1`.
      flops_per_token: model FLOPs per token for the MFU estimate; default from parameter counts.

    Raises:
      ConfigError: no trainable variables, or a mesh that does not fit the devices (MeshError).
    """

    def __init__(
        self,
        model: nnx.Module,
        config: TrainConfig,
        *,
        mesh: jax.sharding.Mesh | None = None,
        devices: Sequence[jax.Device] | None = None,
        wrt: Filter = nnx.LoRAParam,
        forward: Forward = masked_batch_logits,
        penalty: Penalty | None = adapter_l1,
        flops_per_token: float | None = None,
    ) -> None:
        self.config = config
        self.mesh = mesh if mesh is not None else make_mesh(config.mesh, devices)
        self.info = process_info()
        # Which layer carries which adapter, so a checkpoint can rebuild them (slim_jax.generate).
        self.adapter_spec = adapter_spec(model)
        # Training mode: cluster statistics follow the data, dropout is on.
        train_view = nnx.view(model, deterministic=False, use_running_average=False,
                              raise_if_not_found=False)
        self.graphdef, params, frozen, mutable = split_model(train_view, wrt)
        frozen = cast_floating(frozen, resolve_frozen_dtype(config.frozen_dtype))
        self.tx = make_optimizer(config.optimizer, config.steps)
        self.schedule = learning_rate_schedule(config.optimizer, config.steps)
        self.definition = StepDefinition(
            self.graphdef, self.tx, wrt, forward, penalty if config.l1_coeff > 0 else None,
            config.l1_coeff, config.grad_accum_steps,
        )
        rules = config.rules
        place = lambda tree: shard(tree, tree_shardings(tree, self.mesh, rules))
        self.frozen = place(frozen)
        # The step donates the adapter and state buffers; copies keep the caller's model intact.
        params, mutable = _copy_arrays(place(params)), _copy_arrays(place(mutable))
        opt_shardings = tree_shardings(jax.eval_shape(self.tx.init, params), self.mesh, rules)
        opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(params)
        self.state = TrainState(place(jnp.zeros((), jnp.int32)), params, mutable, opt_state)
        self._step_fn = compile_train_step(self.definition, self.state, self.frozen, self.mesh,
                                           rules)
        self._step = 0
        n_trained, n_frozen = count_params(params), count_params(frozen)
        self.flops_per_token = flops_per_token or training_flops_per_token(n_frozen, n_trained)
        peak = config.peak_flops_per_device or peak_flops_per_device(self.mesh.devices.flat[0])
        self.peak_flops = None if peak is None else peak * self.mesh.devices.size
        log.info("trainer: %d trained / %d frozen parameters on mesh %s", n_trained, n_frozen,
                 dict(self.mesh.shape))

    @property
    def step(self) -> int:
        """Optimiser updates applied so far."""
        return self._step

    def model(self) -> nnx.Module:
        """A copy of the model with the current adapters and state (in training mode; call
        `.eval()` on it for inference)."""
        s = self.state
        return merge_model(self.graphdef, s.params, self.frozen, s.mutable, copy=True)

    def train_step(self, local_batch: HostBatch) -> dict[str, jax.Array]:
        """Dispatch one update on this process's slice of the global batch.

        Args:
          local_batch: `{key: [global_batch / process_count, ...]}` host arrays.

        Returns:
          The step's metrics (`loss`, `ce`, `l1`, `grad_norm`, `target_tokens`, `finite`) as
          device scalars; reading one waits for the step.

        Raises:
          BatchSizeError: the global batch does not split over the batch axes and micro-steps.
        """
        rows = next(iter(local_batch.values())).shape[0]
        check_global_batch(rows * self.info.process_count, self.mesh, self.config.rules,
                           micro_steps=self.config.grad_accum_steps)
        batch = global_batch(local_batch, self.mesh, self.config.rules)
        self.state, metrics = self._step_fn(self.state, self.frozen, batch)
        self._step += 1
        return metrics

    def checkpoint_items(self) -> dict[str, Any]:
        """The pytrees a checkpoint stores: adapters, mutable state, optimiser state."""
        s = self.state
        return {"adapters": s.params, "state": s.mutable, "optimizer": s.opt_state}

    def save(
        self, checkpointer: Checkpointer, data_position: Mapping[str, Any] | None = None
    ) -> bool:
        """Start saving the current state and data position under the current step; False if
        that step is already saved."""
        position = None if data_position is None else dict(data_position)
        meta: dict[str, Any] = {"data_position": position}
        if self.adapter_spec:
            meta[ADAPTER_SPEC_KEY] = self.adapter_spec
        return checkpointer.save(self._step, self.checkpoint_items(), meta)

    def restore(self, checkpointer: Checkpointer, step: int | None = None) -> dict[str, Any]:
        """Load a checkpoint (the newest when `step` is None) into this trainer's shardings,
        whatever mesh wrote it; returns its metadata (`step`, `data_position`)."""
        items, meta = checkpointer.restore(self.checkpoint_items(), step)
        step_array = shard(jnp.asarray(meta["step"], jnp.int32), self.state.step.sharding)
        self.state = TrainState(step_array, items["adapters"], items["state"], items["optimizer"])
        self._step = int(meta["step"])
        return meta

    def fit(
        self,
        batches: Iterator[HostBatch],
        *,
        checkpointer: Checkpointer | None = None,
        resume: bool = True,
        evaluate: Periodic | None = None,
    ) -> TrainResult:
        """Train until `config.steps` updates, the end of the data, or a stop signal.

        Resumes from the newest checkpoint (state and data position) when there is one, and
        drops the `metrics.jsonl` records of later steps (a kill after them), so every step is
        logged once. Saves every `save_every` steps, at the end, and on SIGTERM, SIGINT or
        SLURM's SIGUSR1 (`train.preemption`): then it stops cleanly with `stopped ==
        "preempted"` and the signal's name in `result.signal`; `result.check_completed()` turns
        that into a one-line `TrainingInterrupted` for a command line to print. Process 0 writes
        `metrics.jsonl` and `loss.png` into `run_dir` and shows a progress bar with loss,
        tokens/s and MFU.

        Args:
          batches: this process's batch slices; a `ResumableBatches` (`slim_jax.data.
            BatchIterator`) also has its position checkpointed and restored.
          checkpointer: where to save; default `<run_dir>/checkpoints` (none without run_dir).
          resume: restore the newest checkpoint first, if any.
          evaluate: measure the model along training (`slim_jax.train.evaluation.Periodic`:
            every k steps and at the last; records in `<run_dir>/evals.jsonl` and
            `result.evals`); a curve point equals evaluating that step's checkpoint.

        Raises:
          NonFiniteLossError: a step's loss or gradient norm was NaN/inf. The message names the
            step and its batch (data position; the batch is saved into run_dir); the update was
            not applied and the checkpoints already written are kept.
        """
        return run(self, batches, checkpointer=checkpointer, resume=resume, evaluate=evaluate)
