"""`quantserve quantize`: the engine on a local file, no service needed; prints the report.

Worker side: it needs the worker extra (torch, onnxruntime, rich). `app/cli.py` imports this module only
when the command runs, and answers with an install hint where the extra is missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import rich  # noqa: F401 - fails at import where the worker extra is missing, before any argument is read

HELP = "quantize a local model file with the engine and print its report (needs quantserve[worker])"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantserve quantize", description=HELP)
    p.add_argument("model", type=Path, help="an .onnx, TorchScript or torch.export .pt2 file, or a Hugging Face "
                                            "folder (config.json + *.safetensors), as is or zipped")
    p.add_argument("--method", required=True, help="dynamic | static | qat | weight_only | auto")
    p.add_argument("--config", default="{}", help='method options as JSON, e.g. \'{"granularity": "per_tensor"}\'')
    p.add_argument("--calibration", type=Path, help=".npz calibration data (static, gptq/awq); .jsonl texts for hf")
    p.add_argument("--training", type=Path, help=".npz training data (qat)")
    p.add_argument("--evaluation", type=Path, help=".npz evaluation data (inputs, optional labels); .jsonl for hf")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("-o", "--output", type=Path, required=True, help="folder for the artifacts and report.json")
    return p


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def _summary(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    size, fid, lat, acc = (metrics.get(k) or {} for k in ("size", "fidelity", "latency", "accuracy"))
    rows = [("size", f"{size.get('original_bytes')} -> {size.get('quantized_bytes')} bytes ({size.get('ratio')}x)"),
            ("fidelity", f"{fid.get('source')}: sqnr {fid.get('sqnr_db')} dB, cosine {fid.get('cosine')}, "
                         f"top-1 agreement {fid.get('top1_agreement')}"),
            ("latency", f"{lat.get('float_ms_p50')} -> {lat.get('quantized_ms_p50')} ms ({lat.get('speedup')}x, "
                        f"{lat.get('runtime')})")]
    if acc:
        rows.append(("accuracy", f"{acc.get('float')} -> {acc.get('quantized')} ({acc.get('delta'):+})"))
    ppl = metrics.get("perplexity")
    if ppl:
        rows.append(("perplexity", f"{ppl.get('float')} -> {ppl.get('quantized')} ({ppl.get('delta'):+})"))
    rows += [("warning", w) for w in metrics.get("warnings", [])]
    return rows


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from worker import engine
    from worker.engine.errors import UnknownFormatError
    from worker.engine.formats.detect import detect_model_format
    from worker.engine.types import ModelFormat

    console = Console(stderr=True)
    try:
        # A local Hugging Face folder is read in place; an upload would be its zip.
        fmt = ModelFormat.hf if args.model.is_dir() else detect_model_format(args.model)
        config = json.loads(args.config)
    except (UnknownFormatError, OSError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quantserve-") as work, Progress(
            TextColumn("{task.description:<12}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("loading", total=1.0)
        try:
            result = engine.quantize(
                args.model, fmt, args.method, config, Path(work), device=args.device,
                calibration_path=args.calibration, training_path=args.training, evaluation_path=args.evaluation,
                model_name=args.model.stem, progress=lambda s, f: progress.update(task, description=s, completed=f),
                log=lambda level, message: progress.console.print(f"[dim]{level}[/] {message}"))
        except (engine.EngineError, ValueError) as exc:  # ValueError: the config did not validate
            console.print(f"[red]error:[/] {exc}")
            return 2
        for artifact in result.artifacts:
            shutil.copy2(artifact.path, args.output / artifact.filename)
    report = {"format": fmt.value, "method": args.method, "config": config, "metrics": result.metrics,
              **result.report}
    (args.output / "report.json").write_text(json.dumps(report, indent=2, default=str))
    table = Table(title=f"{args.model.name}: {fmt.value}/{args.method}", show_header=False)
    for key, value in _summary(result.metrics):
        table.add_row(key, value)
    console.print(table)
    for artifact in result.artifacts:
        print(args.output / artifact.filename)
    print(args.output / "report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
