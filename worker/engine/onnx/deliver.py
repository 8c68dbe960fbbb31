"""Only a valid ONNX artifact leaves the engine: build, check, and fall back before failing as engine_error.

onnxruntime's quantizers can write models that onnx.checker or onnxruntime itself refuse (per-channel
DequantizeLinear below opset 13, int4 Gather below 21, ...), and say nothing. Each method lists its
variants, best first; the first whose file passes validate.check_artifact is delivered, with a warning
naming what was given up. A node the library blames is also retried kept float, once per variant.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine.onnx import validate

if TYPE_CHECKING:
    from worker.engine.config import MethodConfig
    from worker.engine.context import JobContext


@dataclass(frozen=True)
class Variant:
    """One way to quantize: a label for the report and the options the method's build step takes."""

    label: str
    options: Mapping[str, Any] = field(default_factory=dict)
    gives_up: str = ""  # what the user loses against the first variant, in plain words


@dataclass
class Delivered:
    path: Path
    variant: Variant
    kept_float: set[str]  # nodes kept float because the library blamed them
    warnings: list[str]


Build = Callable[[Variant, set[str]], Path]  # (variant, extra nodes to keep float) -> the file it wrote


def first_valid(ctx: JobContext, variants: Sequence[Variant], build: Build, feeds: Mapping[str, np.ndarray], *,
                full_check: bool, reference: Sequence[np.ndarray] | None = None) -> Delivered:
    """The first variant whose artifact validates; raises validate.engine_error when none does."""
    tried: list[str] = []
    failures: list[validate.ArtifactInvalidError] = []
    for variant in variants:
        kept: set[str] = set()
        for _ in range(2):  # as built, then once more with the blamed node kept float
            path = build(variant, kept)
            try:
                validate.check_artifact(path, feeds, reference=reference, full_check=full_check)
            except validate.ArtifactInvalidError as failure:
                failures.append(failure)
                label = variant.label + (f" with {', '.join(sorted(kept))} float" if kept else "")
                tried.append(label)
                ctx.log("warning", f"{label}: invalid artifact ({failure.stage}: {failure.message[:300]})")
                if failure.node is None or failure.node in kept:
                    break
                kept = kept | {failure.node}
                continue
            return Delivered(path, variant, kept, _warnings(variant, variants[0], kept, failures))
    raise validate.engine_error(failures[-1], tried=tried[:-1])


def _warnings(chosen: Variant, first: Variant, kept: set[str],
              failures: list[validate.ArtifactInvalidError]) -> list[str]:
    if not failures:
        return []
    why = f"{failures[0].stage}: {failures[0].message[:200]}"
    notes = []
    if chosen is not first:
        notes.append(f"onnxruntime's quantizer wrote an invalid model for '{first.label}' ({why}); delivered "
                     f"'{chosen.label}' instead{': ' + chosen.gives_up if chosen.gives_up else ''}")
    if kept:
        notes.append(f"node(s) {', '.join(sorted(kept))} stayed float: the quantized version was invalid ({why})")
    return notes


def checked_or_per_tensor(ctx: JobContext, output: Path, label: str,
                          requantize: Callable[[MethodConfig, set[str], Path], None],
                          feed: Mapping[str, np.ndarray], *, scratch: Path, full_check: bool,
                          reference: Sequence[np.ndarray] | None = None) -> Delivered:
    """`output` as the method built it if valid; else requantize(config, nodes kept float, path) per tensor
    or with the blamed node float. The file delivered ends up at `output`."""
    config = ctx.config
    variants = [Variant(label, {"config": config})]
    if getattr(config, "granularity", None) == "per_channel":
        variants.append(Variant("per-tensor weights", {"config": config.model_copy(
            update={"granularity": "per_tensor"})}, gives_up="per-channel weight scales (less faithful)"))

    def build(variant: Variant, kept: set[str]) -> Path:
        if variant is variants[0] and not kept:
            return output
        path = scratch / f"fallback_{len(list(scratch.glob('fallback_*')))}.onnx"
        requantize(variant.options["config"], kept, path)
        return path

    delivered = first_valid(ctx, variants, build, feed, full_check=full_check, reference=reference)
    if delivered.path != output:
        shutil.move(delivered.path, output)
    return delivered
