"""The benchmark harness every script in benchmarks/ shares (issue 14).

What it guarantees, so that a figure in benchmarks/RESULTS.md means what it says:
  - the machine is recorded: CPU model, cores, the 1-minute load average before and after;
  - a busy machine is refused: if the 1-minute load average before starting exceeds
    `cores * --busy-per-core` (default 0.25 per core: 0.5 on 2 cores) and stays above for
    `--wait-idle` seconds (180), the script exits with one line saying so; `--allow-busy` runs
    anyway and marks every row `BUSY`;
  - both sides get the same threads: `pin_threads` (called before JAX's backend starts) restricts
    the process to the first `--threads` allowed cores (`os.sched_setaffinity`, what `taskset`
    does). XLA's CPU client sizes its intra-op thread pool from that affinity (jaxlib 0.10 has no
    `intra_op_parallelism_threads` flag: XLA aborts on it as unknown), and for one core
    `--xla_cpu_multi_thread_eigen=false` keeps its matmuls single-threaded too (checked: XLA's
    `tf_XLAEigen` pool has 1 thread under --threads 1, 2 under --threads 2); `torch_threads`
    gives PyTorch the same number of intra-op threads;
  - the implementations are interleaved: `interleave` runs one call of each per round, round robin
    with the starting implementation rotated every round, so a change of load falls on all alike;
  - the spread is reported: median and inter-quartile range of the repeats, and the ratio as the
    median of the per-round ratios with their min-max;
  - every table row carries the command, the date and the load average (`Context.table`).

Typical use (see model_forward.py):
    parser = argparse.ArgumentParser(); harness.add_arguments(parser, repeats=10)
    args = parser.parse_args(); ctx = harness.start(args, __file__)  # pins threads, checks the load
    import jax, torch; harness.torch_threads(ctx.threads)
    times = harness.interleave({"slim_jax": f, "torch": g}, repeats=args.repeats)
    print(ctx.table([harness.compare("forward tok/s", times, "slim_jax", "torch", work=n)]))
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

BUSY_PER_CORE = 0.25
WAIT_IDLE_S = 180.0


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15-minute load averages (a function of its own so tests can replace it)."""
    return os.getloadavg()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (`platform.processor()` elsewhere), with its
    widest vector extension and family / model numbers: a virtual machine may name only the
    vendor ("AMD EPYC"), and the same name then covers CPUs whose relative speeds differ."""
    try:
        with open("/proc/cpuinfo") as f:
            fields: dict[str, str] = {}
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return platform.processor() or platform.machine()
    return describe_cpu(fields) or platform.processor() or platform.machine()


def describe_cpu(fields: dict[str, str]) -> str:
    """One line from a processor's /proc/cpuinfo fields.

    >>> describe_cpu({"model name": "AMD EPYC", "cpu family": "25", "model": "17",
    ...               "flags": "fpu avx2 avx512f avx512_bf16"})
    'AMD EPYC (family 25 model 17, avx512f avx512_bf16)'
    >>> describe_cpu({"model name": "AMD EPYC", "flags": "fpu avx2"})
    'AMD EPYC (avx2)'
    """
    flags = fields.get("flags", "").split()
    vector = [f for f in ("avx512f", "avx512_bf16", "amx_tile") if f in flags] or (
        ["avx2"] if "avx2" in flags else [])
    where = (f"family {fields['cpu family']} model {fields['model']}"
             if "cpu family" in fields and "model" in fields else "")
    details = ", ".join(x for x in (where, " ".join(vector)) if x)
    name = fields.get("model name", "")
    return f"{name} ({details})" if name and details else name


def busy_reason(load1: float, cores: int, per_core: float = BUSY_PER_CORE) -> str | None:
    """Why the machine counts as busy (`load1 > cores * per_core`), or None when idle.

    >>> busy_reason(0.3, 2) is None
    True
    >>> busy_reason(1.2, 2)
    '1-min load average 1.20 > 0.50 (2 cores x 0.25)'
    """
    limit = cores * per_core
    if load1 > limit:
        return f"1-min load average {load1:.2f} > {limit:.2f} ({cores} cores x {per_core:g})"
    return None


def add_arguments(parser: argparse.ArgumentParser, *, repeats: int) -> None:
    """The options every benchmark shares: --repeats, --threads, --allow-busy, --busy-per-core."""
    group = parser.add_argument_group("harness")
    group.add_argument("--repeats", type=int, default=repeats,
                       help=f"timed rounds, one call of each implementation per round [{repeats}]")
    group.add_argument("--threads", type=int, default=None,
                       help="cores (and threads) for both sides: the first N this process may use "
                            "[all]; 1 = the one-core case")
    group.add_argument("--allow-busy", action="store_true",
                       help="run on a busy machine and mark every row BUSY instead of refusing")
    group.add_argument("--wait-idle", type=float, default=WAIT_IDLE_S,
                       help=f"seconds to wait for a busy machine to calm down before refusing "
                            f"[{WAIT_IDLE_S:g}: the 1-min load average of a previous benchmark "
                            "takes about 1.5 minutes to decay]")
    group.add_argument("--busy-per-core", type=float, default=BUSY_PER_CORE,
                       help=f"busy when the 1-min load average before starting exceeds cores x "
                            f"this [{BUSY_PER_CORE}]")


def pin_threads(threads: int | None) -> int:
    """Restrict this process to `threads` cores (XLA's intra-op pool is sized from the affinity);
    returns the number of cores used. Must run before JAX's backend starts (XLA reads the
    affinity and XLA_FLAGS then)."""
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            raise SystemExit("harness.pin_threads must run before JAX's first computation "
                             "(XLA reads its thread flags when the backend starts)")
    cores = sorted(os.sched_getaffinity(0))
    if threads is not None:
        if not 1 <= threads <= len(cores):
            raise SystemExit(f"--threads {threads}: this process may use {len(cores)} cores "
                             f"({cores}); choose 1 to {len(cores)}")
        cores = cores[:threads]
        os.sched_setaffinity(0, cores)
    n = len(cores)
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_cpu_multi_thread_eigen")]
    if n == 1:
        flags.append("--xla_cpu_multi_thread_eigen=false")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # never wait on an accelerator plugin
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    return n


def torch_threads(n: int) -> None:
    """Give PyTorch the `n` intra-op threads XLA has (and one inter-op thread, as XLA's CPU
    client runs one program at a time here)."""
    import torch  # heavy, optional: only scripts that compare against PyTorch import it

    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # already set, or torch already ran parallel work
        torch.set_num_interop_threads(1)


@dataclasses.dataclass
class Context:
    """The conditions of one benchmark run: printed above its table and in every row."""

    command: str
    date: str
    cpu: str
    cores: int
    threads: int
    load_before: tuple[float, float, float]
    busy: str | None

    def load_text(self) -> str:
        now = load_average()[0]
        text = f"{self.load_before[0]:.2f} -> {now:.2f}"
        return f"BUSY {text}" if self.busy else text

    def header(self) -> str:
        return "\n".join([
            f"# command: {self.command}",
            f"# date: {self.date}; cpu: {self.cpu}; {self.threads} of {self.cores} cores used "
            f"(threads per side {self.threads}); load average before {self.load_before[0]:.2f} "
            f"{self.load_before[1]:.2f} {self.load_before[2]:.2f}",
            *([f"# BUSY machine ({self.busy}): figures NOT idle figures"] if self.busy else []),
        ])

    def table(self, rows: Sequence[Comparison]) -> str:
        """A markdown table: one row per comparison, each with the command, date and load."""
        lines = ["| measure | A: median [IQR] | B: median [IQR] | A/B speed (per-round min-max) "
                 "| load 1-min before -> after | date | command |", "|---|---|---|---|---|---|---|"]
        for c in rows:
            lines.append(f"| {c.measure} | {c.a}: {c.a_text} | {c.b}: {c.b_text} | "
                         f"{c.speedup:.2f}x ({c.speedup_min:.2f}-{c.speedup_max:.2f}) | "
                         f"{self.load_text()} | {self.date} | `{self.command}` |")
        return "\n".join(lines)

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"load_after": load_average()[0]}


def start(args: argparse.Namespace, script: str, argv: Sequence[str] | None = None) -> Context:
    """Check the load (wait up to --wait-idle seconds, then refuse or mark), pin threads; call
    first, before any JAX computation.

    `script`: the calling script's `__file__`; `argv`: its arguments (default `sys.argv[1:]`),
    together the command recorded in every row."""
    cores_total = os.cpu_count() or 1
    load = load_average()
    busy = busy_reason(load[0], cores_total, args.busy_per_core)
    waited = 0.0
    while busy and not args.allow_busy and waited < args.wait_idle:
        if waited == 0:
            print(f"# waiting up to {args.wait_idle:g} s for the machine to calm down: {busy}",
                  flush=True)
        time.sleep(10.0)
        waited += 10.0
        load = load_average()
        busy = busy_reason(load[0], cores_total, args.busy_per_core)
    if busy and not args.allow_busy:
        raise SystemExit(f"machine busy: {busy}; wait until it is idle, or pass --allow-busy "
                         "to run anyway with every row marked BUSY")
    threads = pin_threads(args.threads)
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", f"benchmarks/{os.path.basename(script)}", *argv])
    ctx = Context(command=command,
                  date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                  cpu=cpu_model(), cores=cores_total, threads=threads, load_before=load,
                  busy=busy)
    print(ctx.header(), flush=True)
    return ctx


def interleave(fns: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 1,
               clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each timed call of every function (each must block until its work is done).

    Each function is first called `warmup` times untimed (compilation), then `repeats` rounds
    run one call of each; round r starts at function `r mod n` and goes round robin, so no
    function always follows the same other one and a change of load falls on all alike.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            begin = clock()
            fns[name]()
            times[name].append(clock() - begin)
    return times


@dataclasses.dataclass(frozen=True)
class Stats:
    """Median, quartiles and range of repeated measurements."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        """
        >>> Stats.of([4.0, 1.0, 3.0, 2.0, 5.0])
        Stats(median=3.0, q1=2.0, q3=4.0, min=1.0, max=5.0, n=5)
        """
        v = sorted(values)
        if len(v) == 1:
            return cls(v[0], v[0], v[0], v[0], v[0], 1)
        q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
        return cls(statistics.median(v), q1, q3, v[0], v[-1], len(v))


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Implementation `a` against `b` on one measure; `speedup` > 1 means `a` is faster."""

    measure: str
    a: str
    b: str
    a_text: str
    b_text: str
    speedup: float
    speedup_min: float
    speedup_max: float

    def line(self) -> str:
        return (f"RATIO {self.measure}: {self.a} is {self.speedup:.2f}x {self.b} "
                f"(per-round {self.speedup_min:.2f}-{self.speedup_max:.2f}; > 1 = {self.a} faster)")


def describe(seconds: Sequence[float], work: float | None = None, unit: str = "/s") -> str:
    """`median [q1-q3]` of the rates `work / seconds`, or of the seconds without `work`.

    >>> describe([1.0, 2.0, 4.0], work=8000)
    '4,000 [2,667-5,333] /s'
    >>> describe([0.5, 0.25, 1.0])
    '0.500 [0.375-0.750] s'
    """
    s = Stats.of(seconds)
    if work is None:
        return f"{s.median:.3f} [{s.q1:.3f}-{s.q3:.3f}] s"
    return f"{_num(work / s.median)} [{_num(work / s.q3)}-{_num(work / s.q1)}] {unit}".rstrip()


def _num(x: float) -> str:
    """
    >>> _num(12345.6), _num(1.234)
    ('12,346', '1.23')
    """
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def compare(measure: str, times: Mapping[str, Sequence[float]], a: str, b: str, *,
            work: float | None = None, unit: str = "/s") -> Comparison:
    """`a` against `b` from `interleave`'s times: per-round speed ratios `t_b / t_a`.

    >>> compare("step", {"x": [1.0, 1.0, 2.0], "y": [2.0, 3.0, 2.0]}, "x", "y").speedup
    2.0
    """
    ratios = sorted(tb / ta for ta, tb in zip(times[a], times[b], strict=True))
    return Comparison(measure, a, b, describe(times[a], work, unit), describe(times[b], work, unit),
                      statistics.median(ratios), ratios[0], ratios[-1])


def matmul_peak(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """This machine's measured matmul FLOP/s under the current thread setting: `2 n^3` over the
    fastest of `repeats` jitted n x n products (the best is the least disturbed one)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    times = interleave({"dot": lambda: dot(a, b).block_until_ready()}, repeats=repeats)["dot"]
    return 2 * n**3 / min(times)


def read_bandwidth(mib: int = 1024, repeats: int = 5) -> float:
    """This machine's measured memory read bandwidth in bytes/s under the current thread
    setting: a float32 array of `mib` MiB (far larger than any cache) summed by a jitted
    reduction, which reads every byte once; the fastest of `repeats` rounds."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    times = interleave({"sum": lambda: total(x).block_until_ready()}, repeats=repeats)["sum"]
    return x.nbytes / min(times)


def compiled_flops(compiled: Any) -> float | None:
    """XLA's FLOP count of a compiled program (`jax.jit(f).lower(...).compile()`), or None."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])
