"""What is live at a compiled program's memory peak, in XLA's own account.

`compile_with_peak_buffers` compiles a lowered program with XLA's debug dump switched on for that one
compilation (the `xla_dump_to` compiler option, into a temporary directory removed after) and reads two of
the dump's files: the live ranges, whose "(peak)" section lists every buffer live at the point of peak
memory with its bytes (arguments included), and the buffer assignment, which gives each buffer's shape.
`bench plan --peak-buffers K` reports the K largest shapes there (count x shape, bytes): what a program's
temporaries are made of (a MoE layer's dispatch buffers, gradients, weight copies), without reading dumps
by hand.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
from typing import Any

_PEAK = re.compile(r"^\s*Live ranges at \d+ \(peak\):\s*$")
_LIVE = re.compile(r"^\s+(\S+): (\d+) bytes")
_VALUE = re.compile(r"value: <\d+ (\S+) @\d+> \(size=\d+,offset=\d+\): ([a-z0-9]+\[[\d,]*\]|\()")


def _one(directory: str, suffix: str) -> str | None:
    """The dump file of the compiled module ending in `suffix` (XLA:CPU prefixes `cpu_`; None if absent)."""
    found = sorted(glob.glob(os.path.join(directory, f"*after_optimizations{suffix}")))
    return found[-1] if found else None


def read_peak_buffers(directory: str, top: int) -> dict[str, Any] | None:
    """From an XLA dump `directory` of one compiled module: the bytes live at its peak (`live_bytes`, in
    `buffers` buffers) and the `top` largest shapes among them (`by_shape`: shape, count, bytes; a tuple
    or a buffer whose shape the assignment does not name, such as a loop's state, counts as "other"). None
    when the dump has no
    live ranges (a compiler that does not write them)."""
    live_path, assignment_path = _one(directory, "-live-range.txt"), _one(directory, "-buffer-assignment.txt")
    if live_path is None or assignment_path is None:
        return None
    shapes: dict[str, str] = {}
    with open(assignment_path, encoding="utf-8") as f:
        for line in f:
            m = _VALUE.search(line)
            if m:
                shapes[m.group(1)] = m.group(2) if m.group(2) != "(" else "other"
    live: list[tuple[str, int]] = []
    with open(live_path, encoding="utf-8") as f:
        in_peak = False
        for line in f:
            if _PEAK.match(line):
                in_peak = True
            elif in_peak:
                m = _LIVE.match(line)
                if not m:
                    break
                live.append((m.group(1), int(m.group(2))))
    totals: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for name, size in live:
        shape = shapes.get(name) or shapes.get(name.removesuffix("{}")) or "other"
        totals[shape] += size
        counts[shape] += 1
    return {"live_bytes": sum(size for _, size in live), "buffers": len(live),
            "by_shape": [{"shape": shape, "count": counts[shape], "bytes": size}
                         for shape, size in totals.most_common(top)]}


def compile_with_peak_buffers(lowered, top: int):
    """`lowered.compile()` and, from XLA's dump of that compilation, `read_peak_buffers(..., top)`."""
    with tempfile.TemporaryDirectory(prefix="sdft-peak-") as directory:
        compiled = lowered.compile(compiler_options={"xla_dump_to": directory})
        return compiled, read_peak_buffers(directory, top)
