"""The collectives of a compiled program, read from its optimised HLO text (`compiled.as_text()`).

`bench plan` reports, per kind of collective, how many instructions a program has and how often they
run: an instruction inside a loop runs once per iteration, so the loops' trip counts multiply (XLA:CPU
annotates them as `known_trip_count`; a TPU program's loops carry none, and their counts are read from the
loop condition, `counter < constant`).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s(?P<op>[a-z][\w\-]*)\(")
_CALLEES = re.compile(r"\b(?:condition|body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_SCALAR_CONSTANT = re.compile(r"^\s*%?([\w.\-]+)\s*=\s*[su](?:32|64)\[\]\S*\s+constant\((\d+)\)")
_COUNTER_BELOW = re.compile(r"^\s*ROOT\s.*\bcompare\(%?[\w.\-]+,\s*%?([\w.\-]+)\),\s*direction=LT\b")


def _counted_below(lines: list[str]) -> int | None:
    """N when a loop condition's computation is `counter < N` with N a constant (how a TPU program's loops
    read: unlike XLA:CPU's, they carry no known trip count; the counters JAX's loops make start at 0)."""
    constants = dict(m.groups() for m in map(_SCALAR_CONSTANT.match, lines) if m)
    for line in lines:
        m = _COUNTER_BELOW.match(line)
        if m and m.group(1) in constants:
            return int(constants[m.group(1)])
    return None


def _bytes_of(shapes: list[tuple[str, str]]) -> int:
    """Bytes of arrays given as (HLO dtype, comma-separated dimensions)."""
    return sum(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d) for dtype, dims in shapes)


def shape_bytes(text: str) -> int:
    """Bytes of the arrays an HLO shape names (`f32[8,64]{1,0}`, or a tuple of them)."""
    return _bytes_of(_SHAPE.findall(text))


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """The collectives of an optimised HLO module's text, by kind (`COLLECTIVES`): `count` instructions
    whose results total `bytes`, and how often they run, `executed` times moving `executed_bytes`
    (multiplied by the trip counts of the loops around them where XLA knows them, or where a loop's
    condition compares a counter with a constant). An async pair counts once, at its `-start`, by its
    output (the second half of its result tuple, less scalar contexts)."""
    computations: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            computations[current].append(line)
    # How often each computation runs per execution of the program: its callers' counts times the trip
    # count of a while loop whose body it is (1 where XLA does not know it).
    calls: dict[str, list[tuple[str, int]]] = defaultdict(list)  # caller -> (callee, factor)
    callers: dict[str, int] = defaultdict(int)
    for name, lines in computations.items():
        for line in lines:
            trips = _TRIP_COUNT.search(line)
            body, condition = _BODY.search(line), _CONDITION.search(line)
            trip_count = int(trips.group(1)) if trips else None
            if trip_count is None and body and condition:
                trip_count = _counted_below(computations.get(condition.group(1), []))
            callees = _CALLEES.findall(line)
            branches = _BRANCHES.search(line)
            if branches:
                callees += [c.strip().lstrip("%") for c in branches.group(1).split(",") if c.strip()]
            for callee in callees:
                factor = trip_count if trip_count and body and body.group(1) == callee else 1
                calls[name].append((callee, factor))
                callers[callee] += 1
    runs: dict[str, int] = defaultdict(int)
    runs[entry] = 1
    ready = [name for name in computations if not callers[name]]
    while ready:  # callers before callees (the call graph is acyclic)
        name = ready.pop()
        for callee, factor in calls[name]:
            runs[callee] += runs[name] * factor
            callers[callee] -= 1
            if not callers[callee]:
                ready.append(callee)
    found = {kind: {"count": 0, "bytes": 0, "executed": 0, "executed_bytes": 0} for kind in COLLECTIVES}
    for name, lines in computations.items():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            op = m.group("op")
            kind = op.removesuffix("-start")
            if kind not in found or op.endswith("-done"):
                continue
            shapes = _SHAPE.findall(m.group("shape"))
            if op.endswith("-start"):  # (operands, results[, u32[] contexts: a TPU collective-permute's])
                shapes = [x for x in shapes if x[1] or x[0] not in ("u32", "s32")] or shapes
                shapes = shapes[len(shapes) // 2:]
            size = _bytes_of(shapes)
            times = max(runs.get(name, 0), 1)
            entry_ = found[kind]
            entry_["count"] += 1
            entry_["bytes"] += size
            entry_["executed"] += times
            entry_["executed_bytes"] += size * times
    return {kind: v for kind, v in found.items() if v["count"]}
