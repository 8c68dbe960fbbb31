"""Zoo benchmark (not a test): real third-party models through the engine and through onnxruntime.quantization
used directly, measured the same way, in one run.

For each corpus model (tests/zoo/corpus.py) and each engine method the registry offers for its format, plus
`ort_dynamic` / `ort_static` (onnxruntime's quantize_dynamic / quantize_static with their defaults) and
`ort_best` (per-channel static after onnx.version_converter to opset 13): size ratio, cosine mean and min of
the worst output, the model's task check, speed-up (float vs quantized, interleaved, batch 1, one thread,
median within a time budget) and quantize time. A failure is a short reason in its row, never a crash.

`make bench-zoo`, or `python bench/zoo.py [NAME ...] [--fresh] [--budget S]`. Quantize outcomes are cached
per pair (the zoo tests share them; --fresh quantizes again). The table goes to stdout and to
$QUANTSERVE_ZOO_CACHE/bench/zoo.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.zoo import corpus, fetch, measure, run_pair  # noqa: E402
from tests.zoo.corpus import MODELS, ZooModel  # noqa: E402
from worker import engine  # noqa: E402


def variants(model: ZooModel) -> list[str]:
    methods = [str(method) for (fmt, method) in engine.SPECS if fmt == model.format]
    return methods + (list(run_pair.ORT_VARIANTS) if model.format == "onnx" else [])


def _short(text: str, limit: int = 90) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _reason(outcome: dict[str, Any]) -> str:
    error = outcome.get("error") or {}
    code = error.get("code") or error.get("type")
    return _short(f"{code}: {error.get('message')}")


class FloatModel:
    """The upload, its evaluation feeds and outputs, computed once per model."""

    def __init__(self, model: ZooModel) -> None:
        self.runner = measure.load_runner(corpus.model_path(model), model.format)
        self.feeds = measure.sample_feeds(corpus.evaluation_path(model), self.runner.ranks)
        self.outs = measure.run_all(self.runner, self.feeds)
        self.names = list(self.runner.output_names)
        self.bytes = corpus.model_path(model).stat().st_size


def measure_row(model: ZooModel, variant: str, base: FloatModel, *, fresh: bool, budget_s: float) -> dict[str, Any]:
    outcome = run_pair.outcome(model, variant, fresh=fresh)
    row: dict[str, Any] = {"model": model.name, "variant": variant, "quantize_s": outcome.get("seconds"),
                           "notes": outcome.get("notes", [])}
    if outcome.get("leftovers"):
        row["notes"] = [*row["notes"], f"left {len(outcome['leftovers'])} temp files"]
    reported = (outcome.get("metrics") or {}).get("fidelity")
    if reported:
        row["reported"] = {k: reported.get(k) for k in ("cosine", "cosine_min", "top1_agreement")}
        row["warnings"] = outcome["metrics"].get("warnings", [])
    artifact = next((Path(a["path"]) for a in outcome.get("artifacts", []) if a["kind"] == "model"), None)
    if not outcome["ok"] or artifact is None:
        row["error"] = _reason(outcome) if not outcome["ok"] else "no model artifact"
        row["error_full"] = (outcome.get("error") or {}).get("message")
        return row
    row["size_ratio"] = artifact.stat().st_size / base.bytes
    try:
        runner = measure.load_runner(artifact, model.format)
        outs = measure.run_all(runner, base.feeds)
    except Exception as exc:  # noqa: BLE001 - an artifact that does not load or run is this row's finding
        row["error"] = _short(f"invalid artifact: {exc}")
        row["error_full"] = str(exc)
        return row
    fidelity = measure.fidelity(base.names, base.feeds, base.outs, outs)
    worst, mean, minimum = fidelity.worst
    task = measure.task_check(model, base.feeds, base.outs, outs)
    feed = base.feeds[0]
    float_ms, quant_ms, runs = measure.interleaved_ms(lambda: base.runner(feed), lambda: runner(feed), budget_s)
    row.update(per_output=fidelity.per_output, worst_output=worst, cosine=mean, cosine_min=minimum,
               task={"label": task.label, "value": task.value, "detail": task.detail},
               float_ms=float_ms, quant_ms=quant_ms, speedup=float_ms / quant_ms, latency_runs=runs)
    return row


def _cells(row: dict[str, Any]) -> list[str]:
    by = "onnxruntime" if row["variant"].startswith("ort_") else "quantserve"
    head = [row["model"], by, row["variant"].removeprefix("ort_")]
    seconds = f"{row['quantize_s']:.1f}" if row.get("quantize_s") is not None else ""
    if "error" in row:
        size = f"{row['size_ratio']:.3f}" if "size_ratio" in row else ""
        return [*head, size, "", "", "", "", seconds, row["error"]]
    task = row["task"]
    value = "n/a" if task["value"] is None else f"{task['value']:.3f}"
    notes = list(row.get("notes", []))
    if row.get("reported") and row["reported"].get("cosine_min") is not None:
        notes.append(f"reported {row['reported']['cosine']:.3f}/{row['reported']['cosine_min']:.3f}")
    return [*head, f"{row['size_ratio']:.3f}", f"{row['cosine']:.4f}", f"{row['cosine_min']:.4f}",
            f"{task['label']} {value}", f"{row['speedup']:.2f}", seconds, "; ".join(notes)]


COLUMNS = ["model", "by", "method", "size", "cos mean", "cos min (worst output)", "task check", "speed-up",
           "quantize s", "note"]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models (default all): {', '.join(MODELS)}")
    parser.add_argument("--fresh", action="store_true", help="quantize again instead of reusing cached outcomes")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed runs per row (default 3)")
    args = parser.parse_args(argv)
    models = [MODELS[n] for n in args.names] if args.names else list(MODELS.values())
    console = Console()
    if not console.is_terminal:
        console = Console(width=220)  # a log or a pipe: one row per line, not folded into 80 columns
    rows: list[dict[str, Any]] = []
    described = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("zoo", total=sum(len(variants(m)) for m in models))
        for model in models:
            fetch.fetch_model(model)
            fetch.fetch_inputs(model)
            described.append(fetch.describe(model))
            base = FloatModel(model)
            for variant in variants(model):
                progress.update(task, description=f"{model.name} {variant}")
                try:
                    rows.append(measure_row(model, variant, base, fresh=args.fresh, budget_s=args.budget))
                except Exception as exc:  # noqa: BLE001 - one broken row must not lose the others
                    rows.append({"model": model.name, "variant": variant, "error": _short(f"bench: {exc}")})
                progress.advance(task)
    table = Table(title="zoo: quantserve vs onnxruntime.quantization used directly (batch 1, one thread)")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*_cells(row))
    console.print(table)
    out = corpus.cache_dir() / "bench"
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".filtered" if args.names else ""
    (out / f"zoo{suffix}.json").write_text(json.dumps({"corpus": described, "rows": rows}, indent=1, default=str))
    (out / f"zoo{suffix}.md").write_text(markdown(rows))
    console.print(f"written: {out / f'zoo{suffix}.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
