"""The trainer: sharded state, the compiled step, and the loop with checkpoints, logs and stops.

>>> import tempfile
>>> from flax import nnx
>>> from slim_jax.models.llama import Llama, LlamaConfig
>>> from slim_jax.nn import LoRAConfig, inject
>>> from slim_jax.parallel import MeshConfig
>>> model = Llama(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
...                           num_heads=2, num_kv_heads=1), rngs=nnx.Rngs(0))
>>> _ = inject(model, "q_proj|v_proj", LoRAConfig(rank=2), rngs=nnx.Rngs(1))
>>> batch = {"tokens": np.ones((2, 4), np.int32), "segment_ids": np.ones((2, 4), np.int32),
...          "targets": np.ones((2, 4), np.int32), "target_mask": np.ones((2, 4), np.float32)}
>>> config = TrainConfig(steps=2, mesh=MeshConfig(data=1), progress=False)
>>> trainer = Trainer(model, config, devices=jax.devices()[:1])
>>> result = trainer.fit(iter([batch, batch]))
>>> result.stopped, len(result.history), trainer.step
('completed', 2, 2)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slim_jax.checkpoint import Checkpointer
from slim_jax.errors import SlimJaxError
from slim_jax.nn import adapter_l1
from slim_jax.parallel import (
    check_global_batch,
    global_batch,
    make_mesh,
    process_info,
    shard,
    tree_shardings,
)
from slim_jax.train.config import TrainConfig
from slim_jax.train.forward import masked_batch_logits
from slim_jax.train.metrics import (
    MetricsLog,
    batch_tokens,
    count_params,
    mfu,
    peak_flops_per_device,
    training_flops_per_token,
)
from slim_jax.train.optimizer import learning_rate_schedule, make_optimizer
from slim_jax.train.plot import plot_loss
from slim_jax.train.preemption import PreemptionGuard
from slim_jax.train.progress import Progress
from slim_jax.train.state import (
    Filter,
    TrainState,
    cast_floating,
    merge_model,
    resolve_frozen_dtype,
    split_model,
)
from slim_jax.train.step import Forward, Penalty, StepDefinition, compile_train_step

__all__ = ["NonFiniteLossError", "ResumableBatches", "TrainResult", "Trainer"]

log = logging.getLogger(__name__)
HostBatch = Mapping[str, np.ndarray]
Stop = Literal["completed", "preempted", "data_exhausted"]


class NonFiniteLossError(SlimJaxError):
    """The loss (or gradient) became NaN or infinite; the run stopped before applying it."""


@runtime_checkable
class ResumableBatches(Protocol):
    """An iterator of this process's batch slices whose position can be saved and restored
    (`slim_jax.data.BatchIterator`)."""

    def __next__(self) -> HostBatch: ...

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: Mapping[str, Any]) -> None: ...


@dataclasses.dataclass
class TrainResult:
    """What `Trainer.fit` did.

    Attributes:
      stopped: "completed" (reached `config.steps`), "preempted" (SIGTERM: saved and stopped),
        or "data_exhausted" (the batches ran out first).
      step: optimiser updates applied in total (including those before a resume).
      history: one record per step of this call: step, loss, ce, l1, grad_norm, lr, ...
      checkpoint_step: the newest checkpoint written or restored, or None.
    """

    stopped: Stop
    step: int
    history: list[dict[str, float]]
    checkpoint_step: int | None


@dataclasses.dataclass
class _Pending:
    """A dispatched step whose metrics have not been read yet (read one step later)."""

    step: int
    metrics: dict[str, jax.Array]
    position: dict[str, Any] | None
    batch: HostBatch
    tokens: int


class Trainer:
    """Adapter training of an NNX model on a device mesh.

    The model is split into trained adapters, the frozen base (cast to `config.frozen_dtype`) and
    mutable state; all three and the optimiser state are placed on the mesh by their logical axes,
    and one jitted step (explicit in/out shardings, donated state) updates them.

    Args:
      model: a model with adapters injected (`slim_jax.nn.inject`), implementing `batch_logits`.
        It is not modified; `trainer.model()` returns the trained one.
      config: the run.
      mesh: the device mesh; default `make_mesh(config.mesh, devices)`.
      devices: devices for the default mesh (all by default).
      wrt: filter of the trained variables (`nnx.LoRAParam` covers every `AdapterParam`).
      forward: `(model, batch) -> logits`; default `masked_batch_logits`.
      penalty: the adapter penalty weighted by `config.l1_coeff`; default `adapter_l1`.
      flops_per_token: model FLOPs per token for the MFU estimate; default from parameter counts.

    Raises:
      ConfigError: no trainable variables, or a mesh that does not fit the devices.
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
        # Training mode: cluster statistics follow the data, dropout is on.
        train_view = nnx.view(model, deterministic=False, use_running_average=False,
                              raise_if_not_found=False)
        graphdef, params, frozen, mutable = split_model(train_view, wrt)
        frozen = cast_floating(frozen, resolve_frozen_dtype(config.frozen_dtype))
        self.graphdef = graphdef
        self.tx = make_optimizer(config.optimizer, config.steps)
        self.schedule = learning_rate_schedule(config.optimizer, config.steps)
        self.definition = StepDefinition(
            graphdef, self.tx, wrt, forward, penalty if config.l1_coeff > 0 else None,
            config.l1_coeff, config.grad_accum_steps,
        )
        rules = config.rules
        self.frozen = shard(frozen, tree_shardings(frozen, self.mesh, rules))
        params = shard(params, tree_shardings(params, self.mesh, rules))
        mutable = shard(mutable, tree_shardings(mutable, self.mesh, rules))
        opt_shardings = tree_shardings(jax.eval_shape(self.tx.init, params), self.mesh, rules)
        opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(params)
        step0 = shard(jnp.zeros((), jnp.int32), tree_shardings(jnp.zeros(()), self.mesh, rules))
        self.state = TrainState(step0, params, mutable, opt_state)
        self._step_fn = compile_train_step(self.definition, self.state, self.frozen, self.mesh,
                                           rules)
        self._step = 0
        n_trained, n_frozen = count_params(params), count_params(frozen)
        self.flops_per_token = flops_per_token or training_flops_per_token(n_frozen, n_trained)
        peak = config.peak_flops_per_device or peak_flops_per_device(self.mesh.devices.flat[0])
        self.peak_flops = None if peak is None else peak * self.mesh.devices.size
        self.info = process_info()
        log.info("trainer: %d trained / %d frozen parameters on mesh %s", n_trained, n_frozen,
                 dict(self.mesh.shape))

    # -- state --------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Optimiser updates applied so far."""
        return self._step

    def model(self) -> nnx.Module:
        """The model with the current adapters and state (training mode; `.eval()` it to test)."""
        s = self.state
        return merge_model(self.graphdef, s.params, self.frozen, s.mutable)

    def checkpoint_items(self) -> dict[str, Any]:
        """The pytrees a checkpoint stores: adapters, mutable state, optimiser state."""
        s = self.state
        return {"adapters": s.params, "state": s.mutable, "optimizer": s.opt_state}

    def save(
        self, checkpointer: Checkpointer, data_position: Mapping[str, Any] | None = None
    ) -> bool:
        """Start saving the current state (and the data position) at the current step; False if
        this step is already saved."""
        position = None if data_position is None else dict(data_position)
        return checkpointer.save(self._step, self.checkpoint_items(), {"data_position": position})

    def restore(self, checkpointer: Checkpointer, step: int | None = None) -> dict[str, Any]:
        """Load a checkpoint into this trainer's shardings (any mesh); returns its metadata."""
        items, meta = checkpointer.restore(self.checkpoint_items(), step)
        step_array = shard(jnp.asarray(meta["step"], jnp.int32), self.state.step.sharding)
        self.state = TrainState(step_array, items["adapters"], items["state"], items["optimizer"])
        self._step = int(meta["step"])
        return meta

    # -- one step -----------------------------------------------------------------------------

    def train_step(self, local_batch: HostBatch) -> dict[str, jax.Array]:
        """Dispatch one update on this process's slice of the global batch; returns the metrics
        as device scalars (reading them waits for the step)."""
        rows = next(iter(local_batch.values())).shape[0]
        check_global_batch(rows * self.info.process_count, self.mesh, self.config.rules,
                           micro_steps=self.config.grad_accum_steps)
        batch = global_batch(local_batch, self.mesh, self.config.rules)
        self.state, metrics = self._step_fn(self.state, self.frozen, batch)
        self._step += 1
        return metrics

    # -- the loop -----------------------------------------------------------------------------

    def _checkpointer(self) -> Checkpointer | None:
        if self.config.run_dir is None:
            return None
        cfg = self.config
        return Checkpointer(Path(cfg.run_dir) / "checkpoints", keep=cfg.keep_checkpoints,
                            async_save=cfg.async_checkpoint)

    def fit(
        self,
        batches: Iterator[HostBatch],
        *,
        checkpointer: Checkpointer | None = None,
        resume: bool = True,
    ) -> TrainResult:
        """Train until `config.steps` updates, the data ends, or SIGTERM.

        Resumes from the newest checkpoint (state and data position) when there is one. Saves
        every `save_every` steps, at the end and on SIGTERM; writes `metrics.jsonl` and
        `loss.png` into `run_dir` (process 0).

        Args:
          batches: this process's batch slices (`ResumableBatches` to checkpoint the position).
          checkpointer: where to save; default `<run_dir>/checkpoints` (none without run_dir).
          resume: restore the newest checkpoint first, if any.

        Raises:
          NonFiniteLossError: a step's loss or gradient norm was NaN/inf; the message names the
            step and the batch (its data position; the batch is saved to run_dir). Checkpoints
            already written are kept, and none is written for the bad step.
        """
        cfg = self.config
        own_checkpointer = checkpointer is None
        ckpt = self._checkpointer() if own_checkpointer else checkpointer
        resumable = isinstance(batches, ResumableBatches)
        last_saved: int | None = None
        try:
            if resume and ckpt is not None and ckpt.latest_step() is not None:
                meta = self.restore(ckpt)
                last_saved = self._step
                position = meta.get("data_position")
                if position is not None and resumable:
                    batches.restore(position)  # type: ignore[union-attr]
                elif not resumable:
                    log.warning("resumed at step %d, but the batches cannot be positioned: the "
                                "data starts from its beginning", self._step)
            leader = self.info.is_leader
            run_dir = Path(cfg.run_dir) if cfg.run_dir is not None else None
            metrics_log = MetricsLog(run_dir / "metrics.jsonl" if run_dir and leader else None)
            progress = Progress(cfg.steps, self._step, enabled=cfg.progress and leader)
            history: list[dict[str, float]] = []
            stopped: Stop = "completed"
            clock = {"last": None}

            def finish(p: _Pending) -> None:
                record = self._read(p, clock)
                history.append(record)
                if not record["finite"]:
                    raise self._non_finite(p, record, ckpt, run_dir)
                progress.update(p.step, loss=record["loss"],
                                tokens_per_s=record.get("tokens_per_s"), mfu=record.get("mfu"))
                if p.step % cfg.log_every == 0 or p.step == cfg.steps:
                    metrics_log.write(record)

            pending: _Pending | None = None
            with PreemptionGuard() as guard:
                while self._step < cfg.steps:
                    position_before = batches.state() if resumable else None  # type: ignore[union-attr]
                    try:
                        local = next(batches)
                    except StopIteration:
                        stopped = "data_exhausted"
                        break
                    metrics = self.train_step(local)
                    if pending is not None:
                        finish(pending)  # the previous step's metrics, while this one runs
                    pending = _Pending(self._step, metrics, position_before, local,
                                       batch_tokens(dict(local)) * self.info.process_count)
                    preempted = guard.reached(self._step)
                    due = cfg.save_every > 0 and self._step % cfg.save_every == 0
                    if preempted or due or self._step == cfg.steps:
                        finish(pending)
                        pending = None
                        if ckpt is not None:
                            position = batches.state() if resumable else None  # type: ignore[union-attr]
                            if self.save(ckpt, position):
                                last_saved = self._step
                    if preempted:
                        stopped = "preempted"
                        log.warning("SIGTERM: saved step %d and stopped", self._step)
                        break
                if pending is not None:
                    finish(pending)
            progress.close()
            if ckpt is not None:
                if stopped == "data_exhausted" and last_saved != self._step:
                    position = batches.state() if resumable else None  # type: ignore[union-attr]
                    if self.save(ckpt, position):
                        last_saved = self._step
                ckpt.wait()
            if metrics_log.path is not None and metrics_log.path.exists():
                plot_loss(metrics_log.path)
            return TrainResult(stopped, self._step, history, last_saved)
        finally:
            if own_checkpointer and ckpt is not None:
                ckpt.close()

    def _read(self, p: _Pending, clock: dict[str, float | None]) -> dict[str, Any]:
        """The host-side record of a finished step (this waits for the step)."""
        values = {k: float(v) for k, v in jax.device_get(p.metrics).items()}
        now = time.perf_counter()
        record: dict[str, Any] = {"step": p.step, **values, "finite": bool(values["finite"])}
        record["lr"] = float(self.schedule(p.step - 1))
        record["tokens"] = p.tokens
        last = clock["last"]
        clock["last"] = now
        if last is not None:  # the first step of a call includes compilation: no throughput
            seconds = now - last
            record["step_time_s"] = seconds
            record["tokens_per_s"] = p.tokens / seconds
            util = mfu(record["tokens_per_s"], self.flops_per_token, self.peak_flops)
            if util is not None:
                record["mfu"] = util
        return record

    def _non_finite(
        self, p: _Pending, record: dict[str, Any], ckpt: Checkpointer | None, run_dir: Path | None
    ) -> NonFiniteLossError:
        if ckpt is not None:
            ckpt.wait()
        saved = ""
        if run_dir is not None:
            path = run_dir / f"nonfinite_batch_step{p.step}_process{self.info.process_index}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **{k: np.asarray(v) for k, v in p.batch.items()})
            saved = f"; the batch is saved in {path}"
        last = None if ckpt is None else ckpt.latest_step()
        return NonFiniteLossError(
            f"step {p.step}: loss {record['loss']} / gradient norm {record['grad_norm']} is not "
            f"finite; its batch starts at data position {p.position}{saved}. The update was not "
            f"applied; the last good checkpoint is step {last}"
            + ("" if ckpt is not None else " (checkpointing is off)")
            + ". Lower the learning rate or check the data."
        )
