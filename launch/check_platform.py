#!/usr/bin/env python3
"""Fail fast, in one line, when JAX's devices are not of the expected platform.

    python launch/check_platform.py tpu   # or gpu, cpu

The launchers run it before the command (a TPU VM or GPU node with a CPU-only jax would otherwise
run the job on the host CPUs); exit status 1 and one line on stderr naming the install to fix it.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python launch/check_platform.py tpu|gpu|cpu", file=sys.stderr)
        return 2
    from slim_jax.parallel import PlatformError, check_platform

    try:
        check_platform(argv[0])
    except PlatformError as err:
        print(f"slim_jax: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
