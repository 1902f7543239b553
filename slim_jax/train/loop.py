"""The training loop: batches in, steps out, with checkpoints, metrics, progress and stops.

One step's metrics are read while the next step runs (the host never idles the devices), except
at a checkpoint, where the step is finished first so that a NaN step is never saved.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import jax
import numpy as np
from etils import epath

from slim_jax.checkpoint import Checkpointer
from slim_jax.errors import SlimJaxError
from slim_jax.train.evaluation import Periodic
from slim_jax.train.metrics import MetricsLog, batch_tokens, mfu, read_metrics
from slim_jax.train.plot import plot_loss
from slim_jax.train.preemption import PreemptionGuard
from slim_jax.train.progress import Progress

if TYPE_CHECKING:
    from slim_jax.train.trainer import Trainer

log = logging.getLogger(__name__)
HostBatch = Mapping[str, np.ndarray]
Stop = Literal["completed", "preempted", "data_exhausted"]


class NonFiniteLossError(SlimJaxError):
    """The loss (or gradient) became NaN or infinite; the run stopped before applying it."""


class TrainingInterrupted(SlimJaxError):
    """A stop signal ended training early; its state is saved (see `TrainResult.check_completed`).

    Attributes:
      result: the `TrainResult` of the interrupted run.
    """

    def __init__(self, message: str, result: TrainResult) -> None:
        super().__init__(message)
        self.result = result


@runtime_checkable
class ResumableBatches(Protocol):
    """An iterator of this process's batch slices whose position can be saved and restored
    (`slim_jax.data.BatchIterator`)."""

    def __next__(self) -> HostBatch: ...

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: Mapping[str, Any]) -> None: ...


@dataclasses.dataclass
class TrainResult:
    """What a run did.

    Attributes:
      stopped: "completed" (reached `config.steps`), "preempted" (a stop signal: saved and
        stopped), or "data_exhausted" (the batches ran out first).
      step: optimiser updates applied in total (including those before a resume).
      history: one record per step of this run: step, loss, ce, l1, grad_norm, lr, tokens, ...
      checkpoint_step: the newest checkpoint written or restored, or None.
      signal: the signal that stopped a "preempted" run ("SIGTERM", "SIGINT", "SIGUSR1").
      steps: the steps the run was asked for (`config.steps`).
      checkpoint_dir: where the checkpoints are, or None without checkpoints.
      evals: with `fit(..., evaluate=...)`, one record per evaluated step (`{"step": ...,
        **values}`), those of earlier runs of a resumed run included when they are on disk.
    """

    stopped: Stop
    step: int
    history: list[dict[str, Any]]
    checkpoint_step: int | None
    signal: str | None = None
    steps: int | None = None
    checkpoint_dir: str | None = None
    evals: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def summary(self, what: str = "training") -> str:
        """One line saying how the run ended and what is saved.

        >>> TrainResult("preempted", 43, [], 40, "SIGTERM", 60, "/ckpt").summary()
        'training stopped by SIGTERM at step 43 of 60; checkpoint of step 40 saved in /ckpt'
        """
        if self.stopped == "completed":
            return f"{what} completed {self.step} steps"
        cause = f"stopped by {self.signal or 'a signal'}" if self.stopped == "preempted" else (
            "ran out of data")
        of = "" if self.steps is None else f" of {self.steps}"
        saved = ("; no checkpoint (no run_dir / checkpointer)" if self.checkpoint_step is None
                 else f"; checkpoint of step {self.checkpoint_step} saved in "
                      f"{self.checkpoint_dir}")
        return f"{what} {cause} at step {self.step}{of}{saved}"

    def check_completed(self, what: str = "training",
                        resume: str = "run the same command again to resume") -> TrainResult:
        """This result if the run was not stopped by a signal; else raise `TrainingInterrupted`
        with a one-line message (the summary and how to resume), for the caller to print.

        >>> TrainResult("completed", 4, [], 4).check_completed().step
        4
        >>> try:
        ...     TrainResult("preempted", 2, [], 2, "SIGINT", 4, "ck").check_completed("x", "rerun")
        ... except TrainingInterrupted as err:
        ...     print(err)
        x stopped by SIGINT at step 2 of 4; checkpoint of step 2 saved in ck; rerun
        """
        if self.stopped == "preempted":
            raise TrainingInterrupted(f"{self.summary(what)}; {resume}", self)
        return self


@dataclasses.dataclass
class _Pending:
    """A dispatched step whose metrics have not been read yet."""

    step: int
    metrics: dict[str, jax.Array]
    position: dict[str, Any] | None
    batch: HostBatch
    tokens: int


class _Loop:
    """The state of one `run`: where to save, what to log, what happened."""

    def __init__(self, trainer: Trainer, batches: Iterator[HostBatch],
                 ckpt: Checkpointer | None, evaluate: Periodic | None = None) -> None:
        cfg = trainer.config
        self.trainer, self.batches, self.ckpt = trainer, batches, ckpt
        self.resumable = isinstance(batches, ResumableBatches)
        self.run_dir = epath.Path(cfg.run_dir) if cfg.run_dir is not None else None
        self.leader = trainer.info.is_leader
        self.metrics_log = MetricsLog(
            self.run_dir / "metrics.jsonl" if self.run_dir is not None and self.leader else None)
        self.evaluate = evaluate
        self.evals_log = MetricsLog(
            self.run_dir / evaluate.file
            if evaluate is not None and self.run_dir is not None and self.leader else None)
        self.evals: list[dict[str, Any]] = []
        self.progress = Progress(cfg.steps, enabled=False)
        self.history: list[dict[str, Any]] = []
        self.last_saved: int | None = None
        self.guard = PreemptionGuard()
        self._clock: float | None = None

    def position(self) -> dict[str, Any] | None:
        return self.batches.state() if self.resumable else None  # type: ignore[union-attr]

    def resume(self) -> None:
        """Restore the newest checkpoint and the data position, if there is one; drop the
        metrics of later steps (written before a kill), so that no step is logged twice."""
        if self.ckpt is None or self.ckpt.latest_step() is None:
            self.metrics_log.truncate(self.trainer.step)
            self.resume_evals()
            return
        meta = self.trainer.restore(self.ckpt)
        self.last_saved = self.trainer.step
        position = meta.get("data_position")
        if position is not None and self.resumable:
            self.batches.restore(position)  # type: ignore[union-attr]
        elif not self.resumable:
            log.warning("resumed at step %d, but the batches cannot be positioned: the data "
                        "starts from its beginning", self.trainer.step)
        self.metrics_log.truncate(self.trainer.step)
        self.resume_evals()

    def resume_evals(self) -> None:
        """Keep the evaluations of steps up to the restored one (later ones are redone), and
        evaluate the restored step if it is due and missing (stopped before its evaluation)."""
        if self.evaluate is None:
            return
        step = self.trainer.step
        self.evals_log.truncate(step)
        path = self.evals_log.path
        if path is not None and path.exists():
            self.evals = [r for r in read_metrics(path) if int(r["step"]) <= step]
        if (self.evaluate.due(step, self.trainer.config.steps)
                and all(int(r["step"]) != step for r in self.evals)):
            self.run_evaluation()

    def run_evaluation(self) -> None:
        """Measure the model of the current step and record it (every process measures: the
        model is sharded; process 0 writes)."""
        assert self.evaluate is not None
        step = self.trainer.step
        values = self.evaluate.fn(self.trainer.model(), step)
        record: dict[str, Any] = {"step": step, **{k: float(v) for k, v in values.items()}}
        self.evals_log.write(record)
        self.evals.append(record)

    def save(self) -> None:
        if self.ckpt is not None and self.trainer.save(self.ckpt, self.position()):
            self.last_saved = self.trainer.step

    def finish(self, p: _Pending) -> None:
        """Read a step's metrics (waits for it), stop on NaN, update the bar and the log."""
        record = self.record(p)
        self.history.append(record)
        if not record["finite"]:
            raise self.non_finite(p, record)
        self.progress.update(p.step, loss=record["loss"],
                             tokens_per_s=record.get("tokens_per_s"), mfu=record.get("mfu"))
        cfg = self.trainer.config
        if p.step % cfg.log_every == 0 or p.step == cfg.steps:
            self.metrics_log.write(record)

    def record(self, p: _Pending) -> dict[str, Any]:
        trainer = self.trainer
        values = {k: float(v) for k, v in jax.device_get(p.metrics).items()}
        record: dict[str, Any] = {"step": p.step, **values, "finite": bool(values["finite"])}
        record["lr"] = float(trainer.schedule(p.step - 1))  # optax's count during that update
        record["tokens"] = p.tokens
        now, last = time.perf_counter(), self._clock
        self._clock = now
        if last is not None:  # the first step of a run includes compilation: no throughput
            record["step_time_s"] = now - last
            record["tokens_per_s"] = p.tokens / (now - last)
            util = mfu(record["tokens_per_s"], trainer.flops_per_token, trainer.peak_flops)
            if util is not None:
                record["mfu"] = util
        return record

    def non_finite(self, p: _Pending, record: dict[str, Any]) -> NonFiniteLossError:
        if self.ckpt is not None:
            self.ckpt.wait()
        saved = ""
        if self.run_dir is not None:
            name = f"nonfinite_batch_step{p.step}_process{self.trainer.info.process_index}.npz"
            path = self.run_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as f:
                np.savez(f, **{k: np.asarray(v) for k, v in p.batch.items()})
            saved = f"; the batch is saved in {path}"
        last = "off" if self.ckpt is None else self.ckpt.latest_step()
        return NonFiniteLossError(
            f"step {p.step}: loss {record['loss']} / gradient norm {record['grad_norm']} is not "
            f"finite; its batch starts at data position {p.position}{saved}. The update was not "
            f"applied; the last good checkpoint is step {last}. Lower the learning rate or "
            "check the data."
        )

    def run(self) -> Stop:
        """Step until done; returns why it stopped."""
        cfg = self.trainer.config
        self.progress = Progress(cfg.steps, self.trainer.step, enabled=cfg.progress and self.leader)
        try:
            return self._steps()
        finally:
            self.progress.close()

    def _steps(self) -> Stop:
        trainer, cfg = self.trainer, self.trainer.config
        pending: _Pending | None = None
        guard = self.guard
        while trainer.step < cfg.steps:
            before = self.position()
            try:
                local = next(self.batches)
            except StopIteration:
                self.finish_pending(pending)
                if self.last_saved != trainer.step:
                    self.save()
                return "data_exhausted"
            metrics = trainer.train_step(local)
            self.finish_pending(pending)  # the previous step, while this one runs
            tokens = batch_tokens(dict(local)) * trainer.info.process_count
            pending = _Pending(trainer.step, metrics, before, local, tokens)
            preempted = guard.reached(trainer.step)
            due = cfg.save_every > 0 and trainer.step % cfg.save_every == 0
            evaluate = self.evaluate is not None and self.evaluate.due(trainer.step, cfg.steps)
            if preempted or due or evaluate or trainer.step == cfg.steps:
                self.finish(pending)  # never save a step before knowing it is finite
                pending = None
                if preempted or due or trainer.step == cfg.steps:
                    self.save()
            if evaluate and not preempted:  # a stop is not delayed: the resumed run does it
                self.run_evaluation()
            if preempted:
                log.warning("%s: saved step %d and stopped", guard.signal_name,
                            trainer.step)
                return "preempted"
        self.finish_pending(pending)
        return "completed"

    def finish_pending(self, pending: _Pending | None) -> None:
        if pending is not None:
            self.finish(pending)


def run(
    trainer: Trainer,
    batches: Iterator[HostBatch],
    *,
    checkpointer: Checkpointer | None = None,
    resume: bool = True,
    evaluate: Periodic | None = None,
) -> TrainResult:
    """Train `trainer` on `batches` until its `config.steps`, the end of the data, or SIGTERM.

    See `Trainer.fit`, which calls this.
    """
    cfg = trainer.config
    own = checkpointer is None and cfg.run_dir is not None
    ckpt = checkpointer
    if own:
        ckpt = Checkpointer(epath.Path(cfg.run_dir) / "checkpoints", keep=cfg.keep_checkpoints,
                            async_save=cfg.async_checkpoint)
    try:
        loop = _Loop(trainer, batches, ckpt, evaluate)
        with loop.guard:  # a stop signal during the restore stops after the first step
            if resume:
                loop.resume()
            stopped = loop.run()
        if ckpt is not None:
            ckpt.wait()
        if loop.metrics_log.path is not None and loop.metrics_log.path.exists():
            plot_loss(loop.metrics_log.path)
        if stopped != "preempted" and loop.guard.signal_name is not None:
            # The signal came after the last step: the run is complete and saved; pass the
            # signal on to whoever handled it before (by default: the process ends).
            os.kill(os.getpid(), signal.Signals[loop.guard.signal_name])
        return TrainResult(stopped, trainer.step, loop.history, loop.last_saved,
                           loop.guard.signal_name if stopped == "preempted" else None,
                           cfg.steps, None if ckpt is None else str(ckpt.directory),
                           loop.evals)
    finally:
        if own and ckpt is not None:
            ckpt.close()
