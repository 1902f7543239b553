"""Worker of test_multiprocess.py, started by launch/local.py: joins the jax.distributed job,
trains the tiny LoRA model for 3 steps over all processes' devices (each process feeding its slice
of every global batch), checkpoints, and writes its losses (and `leader_time()` beside its own
clock) to `<out>/losses_<process>.json`.

Usage: python tests/train/mp_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out_dir: str) -> None:
    from slim_jax.parallel import initialize_distributed

    info = initialize_distributed()  # first: before anything starts a JAX backend

    import time

    import jax

    from slim_jax.parallel import leader_time

    if info.process_index == 1:
        time.sleep(2.0)  # so that this process's own clock is behind process 0's reading
    agreed, own = leader_time(), int(time.time())

    from slim_jax.parallel import MeshConfig
    from slim_jax.train import Trainer

    jax.config.update("jax_default_matmul_precision", "highest")
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny

    out = Path(out_dir)
    trainer = Trainer(tiny.tiny_model("lora"), tiny.train_config(MeshConfig(data=-1), steps=3,
                                                           run_dir=str(out / "run")))
    batches = tiny.batches(8, process_index=info.process_index, process_count=info.process_count)
    result = trainer.fit(batches)
    record = {
        "losses": [r["loss"] for r in result.history],
        "process_count": info.process_count,
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "checkpoint_step": result.checkpoint_step,
        "leader_time": agreed,
        "own_time": own,
    }
    (out / f"losses_{info.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
