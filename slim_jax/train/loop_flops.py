"""FLOPs of a compiled program with its loops counted as many times as they run.

XLA's cost analysis (`Compiled.cost_analysis()`) counts the body of a `while` loop once: a
program whose layers run under `jax.lax.scan` (`LlamaConfig.scan_layers`), or whose gradient
accumulation is a scan, reports the FLOPs of one layer (one micro-step) where L run. The
compiled program states each loop's trip count (the CPU compiler annotates it,
`known_trip_count`; the TPU compiler leaves the loop's `i < N` condition, N a constant or a
value the loop carries unchanged, its counter's start value and its step), so the exact
count is, for every loop `w` of the program (nested loops recursively):

    flops = reported + sum_w (n_w * flops(body_w) - reported(body_w))

where `reported(body_w)` is XLA's own cost analysis of that body alone (the body counted
once, as in `reported`), and `flops(body_w)` the same sum applied inside the body. A loop that
may also stop on data before its count (greedy decoding: `t < max_new_tokens & ~all(done)`) is
counted at its most: the result is then the FLOPs of a call that runs every such loop to the
end (`LoopFlops.count` "at most"). Loops whose trip count the program does not state at all (a
`while_loop` that stops on data alone) stay counted once: the result is then a lower bound
(`LoopFlops.count` "at least").

The cost analysis of one body parses the program's text with that body as the entry
computation and runs XLA's `HloCostAnalysis` on the host (CPU) client: the same analysis the
TPU compiler's `cost_analysis()` reports (tested equal on whole programs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Literal

import jax

# No public API parses HLO text or runs XLA's cost analysis on an HLO module; both are in jaxlib.
from jax._src.lib import _jax
from jaxlib import _hlo

_COMPUTATION = re.compile(r"^(ENTRY )?%([^\s(]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([^\s=]+) = .*? ([a-z][a-z0-9-]*)\(")
_NAME = re.compile(r"%([^\s,(){}]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_INDEX = re.compile(r"index=(\d+)")
_CONSTANT = re.compile(r"constant\((-?\d+)\)")
_PASS_THROUGH = ("copy", "bitcast", "convert", "reshape")
# Source locations: dropped from a body's text (they refer to the whole module's stack frames).
_METADATA = re.compile(r", metadata=\{[^{}]*\}")

FlopsCount = Literal["exact", "at most", "at least"]


@dataclasses.dataclass(frozen=True)
class LoopFlops:
    """FLOPs of a compiled program, loops counted as they run.

    Attributes:
      flops: the program's FLOPs (per device: the program is one device's part).
      reported: XLA's own figure (each loop body counted once).
      trip_counts: the trip count of each loop found, outermost first (None: not stated).
      stops_early: per loop (as `trip_counts`), whether its condition may also stop it on data
        before that count (which is then the most it runs).
    """

    flops: float
    reported: float
    trip_counts: tuple[int | None, ...]
    stops_early: tuple[bool, ...] = ()

    @property
    def count(self) -> FlopsCount:
        """"exact": every loop's trip count is known; "at most": known, but some loop may stop
        earlier on data (`flops` is a call that runs it to the end); "at least": some loop's
        count is unknown (its body counted once)."""
        if None in self.trip_counts:
            return "at least"
        return "at most" if any(self.stops_early) else "exact"

    @property
    def exact(self) -> bool:
        """`flops` is what every call does."""
        return self.count == "exact"


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    opcode: str
    operands: tuple[str, ...]
    line: str


def _operands(line: str, opcode: str) -> tuple[str, ...]:
    """The `%names` inside the parentheses that follow `opcode(` on `line`."""
    start = line.index(f" {opcode}(") + len(opcode) + 2
    depth, end = 1, start
    while depth:
        depth += {"(": 1, ")": -1}.get(line[end], 0)
        end += 1
    return tuple(_NAME.findall(line[start:end - 1]))


class _Module:
    """The computations of an HLO module's text, their instructions and whom they call."""

    def __init__(self, text: str):
        self.header = ""
        self.blocks: dict[str, list[str]] = {}  # computation -> its lines, in text order
        self.entry = ""
        current: list[str] | None = None
        for line in text.splitlines():
            if line.startswith("HloModule "):
                self.header = line
            elif (match := _COMPUTATION.match(line)) is not None:
                current = self.blocks.setdefault(match.group(2), [line])
                self.entry = match.group(2) if match.group(1) else self.entry
            elif current is not None:
                current.append(line)
                if line == "}":
                    current = None
        self.instructions: dict[str, dict[str, _Instruction]] = {}
        for comp, lines in self.blocks.items():
            found = {}
            for line in lines[1:]:
                if (match := _INSTRUCTION.match(line)) is not None:
                    name, opcode = match.groups()
                    found[name] = _Instruction(name, opcode, _operands(line, opcode), line)
            self.instructions[comp] = found

    def callees(self, comp: str, *, into_loops: bool) -> list[str]:
        """Computations `comp`'s instructions call (fusions, reductions, calls, branches; the
        bodies and conditions of its loops only when `into_loops`)."""
        out = []
        for ins in self.instructions[comp].values():
            if ins.opcode == "while" and not into_loops:
                continue
            tail = ins.line.split(f" {ins.opcode}(", 1)[1]
            out += [n for n in _NAME.findall(tail) if n in self.blocks and n != comp]
        return out

    def loops(self, comp: str) -> list[_Instruction]:
        """The while instructions run by `comp` or what it calls, not inside another loop."""
        seen, todo, out = {comp}, [comp], []
        while todo:
            here = todo.pop()
            out += [i for i in self.instructions[here].values() if i.opcode == "while"]
            for callee in self.callees(here, into_loops=False):
                if callee not in seen:
                    seen.add(callee)
                    todo.append(callee)
        return out

    def root(self, comp: str) -> _Instruction | None:
        return next((i for i in self.instructions[comp].values()
                     if i.line.lstrip().startswith("ROOT ")), None)

    def source(self, comp: str, name: str) -> _Instruction | None:
        """The instruction `name` of `comp`, through copies, bitcasts and converts."""
        ins = self.instructions[comp].get(name)
        while ins is not None and ins.opcode in _PASS_THROUGH and ins.operands:
            ins = self.instructions[comp].get(ins.operands[0])
        return ins

    def constant(self, comp: str, name: str) -> int | None:
        ins = self.source(comp, name)
        match = None if ins is None or ins.opcode != "constant" else _CONSTANT.search(ins.line)
        return None if match is None else int(match.group(1))

    def tuple_index(self, comp: str, name: str) -> int | None:
        """k when `name` is `get-tuple-element(parameter, index=k)` in `comp`."""
        ins = self.source(comp, name)
        if ins is None or ins.opcode != "get-tuple-element":
            return None
        param = self.source(comp, ins.operands[0])
        if param is None or param.opcode != "parameter":
            return None
        return int(_INDEX.search(ins.line).group(1))

    def attribute(self, line: str, key: str) -> str:
        return re.search(rf"{key}=%([^\s,]+)", line).group(1)

    def trip_count(self, comp: str, loop: _Instruction) -> tuple[int | None, bool]:
        """`(n, stops_early)`: the loop's trip count, from XLA's annotation or its condition
        (None when the program does not state it), and whether the condition also stops the
        loop on data (`i < N & ~all(done)`: then n is the most it runs)."""
        if (match := _TRIP_COUNT.search(loop.line)) is not None:
            return int(match.group(1)), False
        cond = self.attribute(loop.line, "condition")
        terms = self.conjuncts(cond, self.root(cond))
        counts = [self.counter_bound(comp, loop, term) for term in terms]
        known = [n for n in counts if n is not None]
        if not known:
            return None, False
        return min(known), len(known) < len(terms)

    def conjuncts(self, comp: str, ins: _Instruction | None) -> list[_Instruction | None]:
        """The terms of a condition `a & b & ...` (`ins` alone when it is no `and`)."""
        if ins is None or ins.opcode != "and" or len(ins.operands) != 2 \
                or not ins.line.split("=", 1)[1].lstrip().startswith("pred[]"):
            return [ins]
        return [t for o in ins.operands for t in self.conjuncts(comp, self.source(comp, o))]

    def counter_bound(self, comp: str, loop: _Instruction,
                      compare: _Instruction | None) -> int | None:
        """The trip count that the condition term `compare` allows: `i + c < N` (or `N > i`),
        the counter `i` a loop element with a constant start and a constant positive step, N
        a constant or a value the loop carries unchanged; None when the term is not that."""
        cond, body = self.attribute(loop.line, "condition"), self.attribute(loop.line, "body")
        if compare is None or compare.opcode != "compare" or len(compare.operands) != 2:
            return None
        left, right = compare.operands
        if "direction=GT" in compare.line:
            left, right = right, left
        elif "direction=LT" not in compare.line:
            return None
        index, offset = self.tuple_index(cond, left), 0
        if index is None:  # `i + c < N`
            index, offset = self.counter_plus(cond, left)
        init = self.source(comp, loop.operands[0])
        update = self.root(body)
        if None in (index, init, update) or init.opcode != "tuple" or update.opcode != "tuple":
            return None
        bound = self.constant(cond, right)
        carried = self.tuple_index(cond, right)
        if bound is None and carried is not None \
                and self.tuple_index(body, update.operands[carried]) == carried:
            bound = self.constant(comp, init.operands[carried])  # `i < n`, n carried unchanged
        start = self.constant(comp, init.operands[index])
        if bound is None:
            return None
        step = self.counter_plus(body, update.operands[index])
        if start is None or step[0] != index or step[1] <= 0:
            return None
        return max(0, math.ceil((bound - offset - start) / step[1]))

    def counter_plus(self, comp: str, name: str) -> tuple[int | None, int]:
        """`(k, c)` when `name` is `element k of the loop's tuple + constant c` in `comp`."""
        add = self.source(comp, name)
        if add is None or add.opcode != "add" or len(add.operands) != 2:
            return None, 0
        a, b = add.operands
        for x, y in ((a, b), (b, a)):
            index, c = self.tuple_index(comp, x), self.constant(comp, y)
            if index is not None and c is not None:
                return index, c
        return None, 0

    def text_with_entry(self, comp: str) -> str:
        """The module's text reduced to `comp` (made the entry) and what it calls."""
        keep, todo = {comp}, [comp]
        while todo:
            for callee in self.callees(todo.pop(), into_loops=True):
                if callee not in keep:
                    keep.add(callee)
                    todo.append(callee)
        out = ["HloModule loop_body"]
        for name, lines in self.blocks.items():
            if name in keep:
                head = lines[0].removeprefix("ENTRY ")
                out += [("ENTRY " if name == comp else "") + head,
                        *(_METADATA.sub("", line) for line in lines[1:]), ""]
        return "\n".join(out)


def _cost(text: str) -> float:
    client = jax.local_devices(backend="cpu")[0].client
    return float(_jax.hlo_module_cost_analysis(client, _hlo.hlo_module_from_text(text))
                 .get("flops", 0.0))


def loop_flops(hlo_text: str, reported: float) -> LoopFlops:
    """The FLOPs of the compiled program `hlo_text` (`Compiled.as_text()`), loops counted as
    they run, from XLA's `reported` figure (`Compiled.cost_analysis()["flops"]`).

    >>> import jax, jax.numpy as jnp
    >>> def f(x, ws):
    ...     return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0].sum()
    >>> compiled = jax.jit(f).lower(jnp.ones((4, 8)), jnp.ones((3, 8, 8))).compile()
    >>> r = loop_flops(compiled.as_text(), compiled.cost_analysis()["flops"])
    >>> r.trip_counts, r.flops >= 3 * 2 * 4 * 8 * 8 > r.reported
    ((3,), True)
    """
    module = _Module(hlo_text)
    counts: list[int | None] = []
    early: list[bool] = []

    @functools.cache
    def body_cost(body: str) -> tuple[float, float]:  # (counted once, as run)
        once = _cost(module.text_with_entry(body))
        return once, once + extra(body)

    def extra(comp: str) -> float:
        total = 0.0
        for loop in module.loops(comp):
            n, stops_early = module.trip_count(comp, loop)
            counts.append(n)
            early.append(stops_early)
            once, full = body_cost(module.attribute(loop.line, "body"))
            total += (1 if n is None else n) * full - once
        return total

    flops = reported + extra(module.entry)
    return LoopFlops(flops, float(reported), tuple(counts), tuple(early))


__all__ = ["FlopsCount", "LoopFlops", "loop_flops"]
