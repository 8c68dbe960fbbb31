"""Nodes static int8 must leave float because one int8 scale cannot hold what flows through them.

onnxruntime's QDQ quantizer gives every quantized tensor one scale. Where a node joins tensors whose ranges
differ by orders of magnitude, the small ones round to a few levels or to zero: YOLOv8's last Concat joins
box coordinates (0 to 320) with class scores (0 to 1), and with its output quantized every score read 0 or
1.25 (nudenet: detection IoU 0.000 at cosine 0.9997, the boxes carrying the cosine). onnxruntime has no
option for this, so the rule is here: such a Concat, and any node that only moves data into a graph output
(quantizing it adds work and rounds exactly what the user reads), stay float.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

MAX_RANGE_RATIO = 32.0  # 5 of 8 bits lost by the smallest input: past this a joined tensor stays float
# Ops that compute nothing: as the last node before a graph output, int8 there only adds a rounding.
DATA_MOVEMENT = frozenset({"Concat", "Reshape", "Transpose", "Split", "Slice", "Squeeze", "Unsqueeze", "Flatten",
                           "Identity", "Gather", "Expand"})


def _span(ranges: Any, tensor: str) -> float | None:
    if tensor not in ranges:
        return None
    data = ranges[tensor]
    low, high = (np.asarray(v, dtype=np.float64) for v in data.range_value)
    span = float(np.max(np.maximum(np.abs(low), np.abs(high))))
    return span if np.isfinite(span) else None


def mixed_range_joins(model: onnx.ModelProto, ranges: Any) -> dict[str, float]:
    """Concat nodes whose inputs' calibrated ranges differ by more than MAX_RANGE_RATIO: name -> the ratio."""
    found = {}
    for node in model.graph.node:
        if node.op_type != "Concat":
            continue
        spans = [s for s in (_span(ranges, t) for t in node.input) if s is not None and s > 0]
        if len(spans) >= 2 and max(spans) / min(spans) > MAX_RANGE_RATIO:
            found[node.name] = round(max(spans) / min(spans), 1)
    return found


def output_data_movement(model: onnx.ModelProto) -> set[str]:
    """Data-movement nodes that write a graph output."""
    outputs = {o.name for o in model.graph.output}
    return {n.name for n in model.graph.node if n.op_type in DATA_MOVEMENT and set(n.output) & outputs}


def warning(joins: dict[str, float]) -> str | None:
    if not joins:
        return None
    worst = max(joins.values())
    return (f"{len(joins)} Concat node(s) join tensors whose ranges differ up to {worst:.0f}x ("
            f"{', '.join(sorted(joins)[:5])}{' ...' if len(joins) > 5 else ''}); they stay float, since one int8 "
            "scale would round the smaller inputs away")
