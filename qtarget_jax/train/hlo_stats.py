"""Per-step counts read from a compiled program's HLO text: matmul FLOPs and collectives, with
every while loop counted by its trip count.

Why: `compiled.cost_analysis()` counts a while-loop body once. A train step with scanned layers,
a microbatch loop and the fused loss's tile loops then reports a small fraction of its work
(the 8B job: ~1% of it). The HLO names each loop's trip count in its condition
(`compare(counter, constant(N)), direction=LT`), so each computation's multiplicity is the
product of the trip counts of the loops around it, and a matmul's FLOPs follow from its shapes.

    stats = hlo_stats(compiled.as_text())
    stats.dot_flops          # FLOPs of every dot/convolution, loops counted by trip count
    stats.dot_flops_once     # the same with every loop body counted once (what cost_analysis does)
    stats.collectives        # {"all-gather": (count, bytes), ...} per step per chip
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

# Collective ops (async "-start" forms counted once; "-done" carries no new data).
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")

_DTYPE_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16,
               "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
               "c64": 64, "c128": 128}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_COMP = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\) -> .* \{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition|branch_computations)=(\{[^}]*\}|%[^\s,)]+)")


@dataclasses.dataclass(frozen=True)
class HloStats:
    dot_flops: float               # matmul FLOPs per step, loops counted by trip count
    dot_flops_once: float          # the same, every loop body counted once
    collectives: dict              # op -> (count per step, bytes per step), per chip
    trip_counts: tuple             # trip count of each while loop, in program order
    unknown_trip_counts: int       # loops whose trip count could not be read (counted once)


def _dims(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every array in a (possibly tuple) HLO shape: [(dtype, dims)]."""
    return [(dt, tuple(int(d) for d in dims.split(",") if d))
            for dt, dims in _ARRAY.findall(shape_text) if dt in _DTYPE_BITS]


def shape_bytes(shape_text: str) -> int:
    """Bytes of an HLO shape ("bf16[2,8]{1,0}", or a tuple of them: summed)."""
    return sum(math.prod(d) * _DTYPE_BITS[dt] // 8 for dt, d in _dims(shape_text))


def _operands(rest: str) -> list[str]:
    """Operand names of an instruction, from the text after its opening parenthesis."""
    depth, out = 1, []
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return re.findall(r"%([^\s,()]+)", rest[:i])
    return out


def _window(rest: str, n: int) -> list[dict]:
    """Per spatial dim: size, stride, pad (lo, hi), lhs_dilate, rhs_dilate of a convolution."""
    m = re.search(r"window=\{([^}]*)\}", rest)
    fields = dict(kv.split("=") for kv in m.group(1).split()) if m else {}
    dims = [dict(size=1, stride=1, pad=(0, 0), lhs_dilate=1, rhs_dilate=1) for _ in range(n)]
    for key in ("size", "stride", "lhs_dilate", "rhs_dilate", "pad"):
        for d, v in enumerate(fields.get(key, "").split("x") if key in fields else []):
            dims[d][key] = tuple(int(p) for p in v.split("_")) if key == "pad" else int(v)
    return dims


def _taps(in_size: int, out_size: int, w: dict) -> float:
    """Mean number of window taps that land on a real input element (not padding or a
    dilation hole): the TPU compiler writes batched matmuls as windowed convolutions whose
    window touches one element per output."""
    if out_size * w["size"] > 1 << 20:
        return float(w["size"])
    span = (in_size - 1) * w["lhs_dilate"]
    hits = sum(1 for o in range(out_size) for k in range(w["size"])
               if 0 <= (p := o * w["stride"] + k * w["rhs_dilate"] - w["pad"][0]) <= span
               and p % w["lhs_dilate"] == 0)
    return hits / out_size


def _dot_flops(op: str, shape: str, rest: str, shapes: dict[str, str]) -> float:
    """2 x output elements x contracted size of one dot / convolution."""
    arrays = _dims(shape)
    out = arrays[0][1] if arrays else ()
    names = _operands(rest)
    lhs = _dims(shapes.get(names[0], "")) if names else []
    if op == "dot":
        contract = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
        if not lhs or contract is None:
            return 0.0
        k = math.prod(lhs[0][1][int(i)] for i in contract.group(1).split(",") if i)
        return 2.0 * math.prod(out) * k
    rhs = _dims(shapes.get(names[1], "")) if len(names) > 1 else []
    labels = re.search(r"dim_labels=([^_]+)_([^-]+)->([^,\s]+)", rest)
    if not lhs or not rhs or labels is None:
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    spatial = sorted(c for c in rhs_l if c.isdigit())
    taps = 1.0
    for d, w in zip(spatial, _window(rest, len(spatial))):
        taps *= _taps(lhs[0][1][lhs_l.index(d)], out[out_l.index(d)], w)
    return 2.0 * math.prod(out) * rhs[0][1][rhs_l.index("i")] * taps


def _trip_count(condition: list[str]) -> Optional[int]:
    """N of a loop condition `ROOT compare(counter, constant(N)), direction=LT` (counter from 0)."""
    consts = {}
    for line in condition:
        m = _INSTR.match(line)
        if m and m.group(3) == "constant":
            value = re.match(r"(-?\d+)\)", m.group(4))
            if value:
                consts[m.group(1)] = int(value.group(1))
        if m and line.lstrip().startswith("ROOT") and m.group(3) == "compare":
            names = _operands(m.group(4))
            if "direction=LT" in m.group(4) and len(names) == 2 and names[1] in consts:
                return consts[names[1]]
    return None


def hlo_stats(text: str) -> HloStats:
    """Matmul FLOPs and collectives of one compiled HLO module (text of `compiled.as_text()`)."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            current = m.group(1)
            comps[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    shapes = {}
    for lines in comps.values():
        for line in lines:
            m = _INSTR.match(line)
            if m:
                shapes[m.group(1)] = m.group(2)

    # Call graph: (callee, factor) per computation; while bodies get their trip count.
    calls: dict[str, list[tuple[str, int, int]]] = {c: [] for c in comps}
    trips, unknown = [], 0
    for name, lines in comps.items():
        for line in lines:
            targets = dict((k, v) for k, v in _CALLS.findall(line))
            if "body" in targets:
                n = _trip_count(comps.get(targets["condition"].lstrip("%"), []))
                trips.append(n)
                unknown += n is None
                calls[name].append((targets["body"].lstrip("%"), n or 1, 1))
                continue
            for key in ("calls", "branch_computations"):
                for callee in re.findall(r"%([^\s,}]+)", targets.get(key, "")):
                    calls[name].append((callee, 1, 1))

    def multiplicity(trip_counted: bool) -> dict[str, float]:
        mult = {c: 0.0 for c in comps}
        order, seen = [], set()

        def visit(c):  # post-order, then reversed: callers before callees
            if c in seen or c not in comps:
                return
            seen.add(c)
            for callee, _, _ in calls[c]:
                visit(callee)
            order.append(c)
        visit(entry)
        mult[entry] = 1.0
        for c in reversed(order):
            for callee, n, _ in calls[c]:
                if callee in mult:
                    mult[callee] += mult[c] * (n if trip_counted else 1)
        return mult

    full, once = multiplicity(True), multiplicity(False)
    flops = flops_once = 0.0
    coll: dict[str, list] = {}
    for name, lines in comps.items():
        if not full[name]:
            continue
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            _, shape, op, rest = m.groups()
            if op in ("dot", "convolution"):
                f = _dot_flops(op, shape, rest, shapes)
                flops += full[name] * f
                flops_once += once[name] * f
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base in COLLECTIVES:
                arrays = _dims(shape)
                size = max((math.prod(d) * _DTYPE_BITS[dt] // 8 for dt, d in arrays), default=0)
                c = coll.setdefault(base, [0.0, 0.0])
                c[0] += full[name]
                c[1] += full[name] * size
    return HloStats(dot_flops=flops, dot_flops_once=flops_once,
                    collectives={k: (int(v[0]), v[1]) for k, v in sorted(coll.items())},
                    trip_counts=tuple(trips), unknown_trip_counts=unknown)
