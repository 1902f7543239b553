"""Worker of test_faults.py: trains the tiny SLIM model with the `Trainer` into RUN_DIR (resuming
from its checkpoints), optionally hitting itself with a signal, or pausing inside a checkpoint
write, so that the test can kill it there.

Usage: python tests/train/fault_worker.py RUN_DIR [--steps N] [--save-every N]
           [--signal-at STEP --signal NAME] [--pause-in-save STEP] [--async-checkpoint]

  --signal-at/--signal: send this process the signal (TERM, INT, USR1, KILL) as the batch of that
    step is drawn, i.e. while step STEP - 1 runs (a real signal, delivered by the OS).
  --pause-in-save: write RUN_DIR/paused (holding the temporary folder's path) and sleep inside
    the checkpoint write of that step, after its files are written and before orbax commits it.
  --async-checkpoint: the trainer writes checkpoints in the background (orbax's async path);
    then the paused write holds up only its background thread, training goes on.

Prints one JSON line (stopped, step, the first step this run trained); on a stop signal the
trainer's one-line message goes to stderr and the exit status is 128 + the signal number. A run
that completes saves its final parameters (every `nnx.Param`, in tree order) to
RUN_DIR/params.npz.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path


class SignalAt:
    """A resumable batch stream that signals this process as batch `at` is drawn."""

    def __init__(self, batches, at: int | None, sig: signal.Signals | None) -> None:
        self.batches, self.at, self.sig, self.drawn = batches, at, sig, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        self.drawn += 1
        if self.sig is not None and self.drawn == self.at:
            os.kill(os.getpid(), self.sig)
        return batch

    def state(self):
        return self.batches.state()

    def restore(self, state):
        self.batches.restore(state)


def pause_in_save(step: int, marker: Path) -> None:
    """Make orbax stop for good just before it renames the checkpoint of `step` into place."""
    from orbax.checkpoint._src.path import atomicity  # the test's hook into orbax's commit

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if Path(str(self._final_path)).name == str(step):
            marker.write_text(str(self.get()))
            await asyncio.sleep(3600)
        return await original(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--signal-at", type=int)
    parser.add_argument("--signal")
    parser.add_argument("--pause-in-save", type=int)
    parser.add_argument("--async-checkpoint", action="store_true")
    args = parser.parse_args()

    import jax
    import numpy as np
    from flax import nnx

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny

    from slim_jax.train import Trainer, TrainingInterrupted

    run_dir = Path(args.run_dir)
    if args.pause_in_save is not None:
        pause_in_save(args.pause_in_save, run_dir / "paused")
    sig = getattr(signal, f"SIG{args.signal}") if args.signal else None
    config = tiny.train_config(steps=args.steps, save_every=args.save_every,
                               run_dir=str(run_dir), keep_checkpoints=2,
                               async_checkpoint=args.async_checkpoint)
    trainer = Trainer(tiny.tiny_model(), config, devices=jax.devices()[:1])
    result = trainer.fit(SignalAt(tiny.batches(8), args.signal_at, sig))
    print(json.dumps({"stopped": result.stopped, "step": result.step,
                      "first_step": result.history[0]["step"] if result.history else None}),
          flush=True)
    if result.stopped == "completed":
        params = jax.tree.leaves(nnx.state(trainer.model(), nnx.Param))
        np.savez(run_dir / "params.npz", *[np.asarray(jax.device_get(p)) for p in params])
    try:
        result.check_completed()
    except TrainingInterrupted as err:
        print(err, file=sys.stderr)
        return 128 + getattr(signal, err.result.signal)
    return 0


if __name__ == "__main__":
    sys.exit(main())
