"""When static int8 loses too much, keep float the layers that lose most, ranked by their own SQNR drop.

The per-layer SQNR the report shows is cumulative (each layer's output in the int8 model against float), so
a layer's own share of the loss is the drop from the best SQNR arriving at its input to the SQNR leaving it.
Ranking by that drop costs one pair of captured runs; quantizing each layer alone (a true sensitivity
sweep, issue 14) would cost one quantization per layer. The fallback then tries keeping the 1, 2, 4, ...
worst layers float and keeps the first candidate that is faithful enough, or the most faithful one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

    from worker.engine.context import JobContext

# Below either, static int8 is "low fidelity" and the fallback runs (evaluate warns at a mean of 0.9).
LOW_MEAN_COSINE = 0.99
LOW_MIN_COSINE = 0.95
STEPS = (1, 4, 16)  # how many of the worst layers a candidate keeps float (each try is a quantization)
MAX_SHARE = 0.2  # never more than this share of the weight layers: past it, int8 is the wrong tool
MIN_GAIN = 0.005  # a candidate must raise the score by this much to be worth its float layers
INPUT_SQNR_DB = 48.0  # what arrives at a first layer: an 8-bit input's ideal SQNR (6.02 dB per bit)

Fidelity = tuple[float, float | None, float]  # (worst output's mean cosine, top-1 agreement, worst sample)


def low(fidelity: Fidelity) -> bool:
    return fidelity[0] < LOW_MEAN_COSINE or fidelity[2] < LOW_MIN_COSINE


def score(fidelity: Fidelity) -> float:
    """The worst output's mean cosine and its worst sample, alike. On the mean alone, 'auto' calibration
    picked percentile on a layout detector and cut its worst page to cosine 0.66 (minmax: 0.81)."""
    return (fidelity[0] + fidelity[2]) / 2


def sqnr_drops(model: onnx.ModelProto, sqnr: dict[str, float]) -> dict[str, float]:
    """Each measured weight node's own loss in dB: the best cumulative SQNR among the nearest weight nodes
    upstream (INPUT_SQNR_DB where there are none) minus its own."""
    producer = {o: n for n in model.graph.node for o in n.output}
    drops = {}
    for node in model.graph.node:
        if node.name not in sqnr:
            continue
        upstream, stack, seen = [], list(node.input), set()
        while stack:
            tensor = stack.pop()
            source = producer.get(tensor)
            if source is None or source.name in seen:
                continue
            seen.add(source.name)
            if source.name in sqnr:
                upstream.append(sqnr[source.name])
            else:
                stack.extend(source.input)
        drops[node.name] = max(upstream, default=INPUT_SQNR_DB) - sqnr[node.name]
    return drops


@dataclass
class Outcome:
    kept: list[str] = field(default_factory=list)  # nodes kept float, worst first; empty: nothing changed
    before: Fidelity | None = None
    after: Fidelity | None = None
    tried: list[dict] = field(default_factory=list)  # for the report: each candidate's size and fidelity


def keep_worst_float(ctx: JobContext, drops: dict[str, float], weight_layers: int,
                     requantize: Callable[[set[str], Path], None], fidelity_of: Callable[[Path], Fidelity],
                     before: Fidelity, scratch: Path) -> tuple[Outcome, Path | None]:
    """Try keeping the worst layers float; returns what was kept and the file to deliver (None: keep yours)."""
    ranked = [name for name, drop in sorted(drops.items(), key=lambda kv: -kv[1]) if drop > 0]
    cap = max(1, int(MAX_SHARE * weight_layers))
    outcome = Outcome(before=before)
    best: tuple[float, list[str], Fidelity, Path] | None = None
    for count in (n for n in STEPS if n <= min(cap, len(ranked))):
        kept = ranked[:count]
        path = scratch / f"sensitive_float_{count}.onnx"
        try:
            requantize(set(kept), path)
            fidelity = fidelity_of(path)
        except Exception as exc:  # noqa: BLE001 - a candidate that fails is no candidate
            ctx.log("warning", f"keeping the {count} most sensitive layer(s) float failed: {exc}")
            continue
        outcome.tried.append({"float_layers": count, "cosine": round(fidelity[0], 6),
                              "cosine_min": round(fidelity[2], 6), "bytes": path.stat().st_size})
        ctx.log("info", f"sensitive layers: {count} kept float -> cosine {fidelity[0]:.4f} (worst sample "
                        f"{fidelity[2]:.4f})")
        if best is None or score(fidelity) > best[0]:
            best = (score(fidelity), kept, fidelity, path)
        if not low(fidelity):
            break
    if best is None or best[0] < score(before) + MIN_GAIN:
        return outcome, None
    outcome.kept, outcome.after = best[1], best[2]
    return outcome, best[3]


def warning(outcome: Outcome, names: dict[str, str]) -> str:
    """Plain words for the report: what was kept float, why, and what it bought."""
    shown = ", ".join(names.get(n, n) for n in outcome.kept[:8]) + (" ..." if len(outcome.kept) > 8 else "")
    before, after = outcome.before, outcome.after
    assert before is not None and after is not None
    return (f"static int8 lost too much on the calibration samples (worst output cosine {before[0]:.3f}, worst "
            f"sample {before[2]:.3f}), so the {len(outcome.kept)} layer(s) that lost most of it stay float: "
            f"{shown} (cosine {after[0]:.3f}, worst sample {after[2]:.3f})")
