#!/usr/bin/env python3
"""Start N local processes of one command as a `jax.distributed` job over loopback (CPU).

Each process gets `SLIM_JAX_COORDINATOR=127.0.0.1:<port>`, `SLIM_JAX_NUM_PROCESSES=N` and its own
`SLIM_JAX_PROCESS_ID`, which `slim_jax.parallel.initialize_distributed()` reads; JAX runs on CPU
with `--devices-per-process` virtual devices each, so an N-process mesh has N x that many devices.
This is how CI tests multi-host code on one machine; the same program runs unchanged on a TPU pod
(`launch/tpu_pod.sh`) or a SLURM cluster (`launch/slurm_gpu.sbatch`).

    python launch/local.py -n 2 -- python -m experiments.slim_finetune --steps 10

Output of every process goes to this terminal (process 0 shows the progress bar). The launcher
exits with the first non-zero exit status; if one process fails the others are stopped; SIGINT
and SIGTERM are passed on to every process (a SIGTERM makes the trainer save and stop).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(rank: int, count: int, port: int, devices: int) -> dict[str, str]:
    """The environment of process `rank` of `count`."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env.update({
        "SLIM_JAX_COORDINATOR": f"127.0.0.1:{port}",
        "SLIM_JAX_NUM_PROCESSES": str(count),
        "SLIM_JAX_PROCESS_ID": str(rank),
        "JAX_PLATFORMS": "cpu",
        "SLIM_JAX_EXPECT_PLATFORM": "cpu",  # initialize_distributed checks it
        "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
    })
    return env


def launch(command: list[str], num_processes: int, devices_per_process: int = 1,
           port: int | None = None) -> int:
    """Run `command` as `num_processes` processes; returns the job's exit status."""
    port = port or free_port()
    procs = [subprocess.Popen(command, env=process_env(r, num_processes, port,
                                                       devices_per_process))
             for r in range(num_processes)]

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        while None in [p.poll() for p in procs]:  # a list: poll every process each round
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed and not status:
                status = failed[0]
                for p in procs:  # one process died: the job cannot go on
                    if p.poll() is None:
                        p.terminate()
            time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return status or next((p.returncode for p in procs if p.returncode), 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--num-processes", type=int, default=2,
                        help="processes to start (default 2)")
    parser.add_argument("--devices-per-process", type=int, default=1,
                        help="virtual CPU devices of each process (default 1)")
    parser.add_argument("--port", type=int, default=None,
                        help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the command after `--`, e.g. -- python -m experiments.slim_finetune")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after `--`")
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num-processes and --devices-per-process must be >= 1")
    return launch(command, args.num_processes, args.devices_per_process, args.port)


if __name__ == "__main__":
    sys.exit(main())
