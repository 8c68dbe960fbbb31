"""Engine benchmark (not a test): every registered (format, method) on small real models, in one run.

For each case: size ratio, accuracy or fidelity, latency speed-up against the float model in the runtime
that serves the artifact, and the engine's wall time. `make bench-engine`; the table goes to stdout and
bench/out/engine.json. `bench/engine.py MiniLM` runs only the cases whose "format/method model" contains
"MiniLM" (case-insensitive), into bench/out/engine.filtered.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import hf_models, models  # noqa: E402
from worker import engine  # noqa: E402
from worker.engine.registry import SPECS  # noqa: E402


@dataclass
class Case:
    label: str
    fmt: str
    method: str
    build: Callable[[Path], Path]  # writes the float model, returns its path
    config: dict[str, Any] = field(default_factory=dict)
    datasets: tuple[str, ...] = ("evaluation",)  # which of calibration/training/evaluation to pass
    text_input: bool = False
    minilm_input: bool = False  # 64 tokenized sentences (input_ids, attention_mask, token_type_ids)
    text_jsonl: bool = False  # an hf model: texts as a .jsonl dataset (evaluation, and calibration for gptq)
    digits32: bool = False  # the digits upscaled to 32x32 (ENGINE.md's CNN size) instead of 8x8


def _cnn(saver: Callable) -> Callable[[Path], Path]:
    return lambda p: saver(models.train_wide_digits_cnn(), torch.zeros(2, 1, 8, 8), p)


def _cnn32(saver: Callable) -> Callable[[Path], Path]:
    return lambda p: saver(models.train_digits_cnn32(), torch.zeros(2, 1, 32, 32), p)


def _mlp(saver: Callable) -> Callable[[Path], Path]:
    return lambda p: saver(models.train_digits_mlp(), torch.zeros(2, 1, 8, 8), p)


# The spread CNN's rows show PTQ that loses points: "auto" calibration picks entropy there, which holds it per-tensor.
MINMAX = {"algorithm": "minmax"}


def _spread(p: Path) -> Path:
    return models.export_onnx(models.spread_digits_cnn(), torch.zeros(2, 1, 8, 8), p)


def _spread_as(saver: Callable) -> Callable[[Path], Path]:
    return lambda p: saver(models.spread_digits_cnn(), torch.zeros(2, 1, 8, 8), p)


PER_TENSOR_MINMAX = {"granularity": "per_tensor", "calibration": MINMAX}
ACCURACY_1PT = {"metric": "accuracy", "max_drop": 0.01}


def _digits_cnn_pt2(p: Path) -> Path:
    return PT2(models.train_digits_cnn(), torch.zeros(2, 1, 8, 8), p)


QAT_W4 = {"epochs": 1, "batch_size": 64, "weight_bits": 4, "granularity": "per_tensor"}


def _lm(p: Path) -> Path:
    return models.export_onnx(models.linear_heavy_transformer(), torch.from_numpy(models.token_ids(2)), p)


def _tiny_llama(p: Path) -> Path:
    return hf_models.tiny_llama_zip(p.parent)


def _minilm(p: Path) -> Path:
    return hf_models.minilm_zip(p.parent)


ONNX, TS, PT2 = models.export_onnx, models.save_torchscript, models.save_torch_export
CASES = [
    Case("digits MLP", "onnx", "dynamic", lambda p: ONNX(models.train_digits_mlp(), torch.zeros(2, 1, 8, 8), p)),
    Case("digits LSTM", "onnx", "dynamic", lambda p: ONNX(models.train_digits_lstm(), torch.zeros(2, 1, 8, 8), p)),
    Case("transformer d256", "onnx", "dynamic", _lm, text_input=True),
    Case("all-MiniLM-L6-v2", "onnx", "dynamic", models.export_minilm_onnx, minilm_input=True),
    Case("digits MLP", "torchscript", "dynamic", _mlp(TS)),
    Case("digits MLP", "torch_export", "dynamic", _mlp(PT2)),
    Case("wide digits CNN", "onnx", "static", _cnn(ONNX), datasets=("calibration", "evaluation")),
    Case("wide digits CNN", "torchscript", "static", _cnn(TS), datasets=("calibration", "evaluation")),
    Case("wide digits CNN", "torch_export", "static", _cnn(PT2), datasets=("calibration", "evaluation")),
    Case("digits CNN 32x32", "onnx", "static", _cnn32(ONNX), datasets=("calibration", "evaluation"), digits32=True),
    Case("digits CNN 32x32", "torchscript", "static", _cnn32(TS), datasets=("calibration", "evaluation"),
         digits32=True),
    Case("digits CNN 32x32", "torch_export", "static", _cnn32(PT2), datasets=("calibration", "evaluation"),
         digits32=True),
    # issue 14: a CNN per-tensor static int8 breaks (tests/models.py), plain and with an accuracy target
    Case("spread digits CNN", "onnx", "static", _spread, {"granularity": "per_tensor", "calibration": MINMAX},
         datasets=("calibration", "evaluation")),
    Case("spread digits CNN", "onnx", "static", _spread, {"granularity": "per_tensor"},
         datasets=("calibration", "evaluation")),  # "auto" calibration: what entropy's clipping does for it
    Case("spread digits CNN", "onnx", "static", _spread,
         {"granularity": "per_tensor", "calibration": MINMAX, "target": {"metric": "accuracy", "max_drop": 0.01}},
         datasets=("calibration", "evaluation")),
    # the same lossy case on the torch formats: plain and with the target (layers kept float, measured in memory)
    *(Case("spread digits CNN", fmt, "static", saver, {**PER_TENSOR_MINMAX, **extra},
           datasets=("calibration", "evaluation"))
      for fmt, saver in (("torchscript", _spread_as(TS)), ("torch_export", _spread_as(PT2)))
      for extra in ({}, {"target": ACCURACY_1PT})),
    Case("wide digits CNN", "torch_export", "qat", _cnn(PT2), {"epochs": 2},
         datasets=("training", "evaluation")),
    # lossy QAT (4-bit per-tensor weights, one epoch), plain and with a cosine target: layers converted float
    *(Case("digits CNN", "torch_export", "qat", _digits_cnn_pt2, {**QAT_W4, **extra},
           datasets=("training", "evaluation"))
      for extra in ({}, {"target": {"metric": "cosine", "max_drop": 0.0006}})),
    Case("transformer d256", "onnx", "weight_only", _lm, {"dtype": "int4", "group_size": 128}, text_input=True),
    Case("transformer d256", "onnx", "weight_only", _lm, {"dtype": "int8"}, text_input=True),
    # issue 14 item 3: int4 (raised to 8 bits where it loses most, to a tuning cosine of 0.99) and bits auto
    Case("all-MiniLM-L6-v2", "onnx", "weight_only", models.export_minilm_onnx, {"dtype": "int4"}, minilm_input=True),
    Case("all-MiniLM-L6-v2", "onnx", "weight_only", models.export_minilm_onnx,
         {"bits": "auto", "max_size_ratio": 0.2}, minilm_input=True),
    # issue 14 item 4: method auto, every ONNX candidate in one job; the delivered one and the whole table
    Case("digits CNN 32x32", "onnx", "auto", _cnn32(ONNX), datasets=("calibration", "evaluation"), digits32=True),
    Case("all-MiniLM-L6-v2", "onnx", "auto", models.export_minilm_onnx, datasets=("calibration", "evaluation"),
         minilm_input=True),
    Case("digits CNN 32x32", "torch_export", "auto", _cnn32(PT2), datasets=("calibration", "evaluation"),
         digits32=True),
    Case("wide digits CNN", "torchscript", "auto", _cnn(TS), datasets=("calibration", "evaluation")),
    Case("digits MLP", "torch_export", "weight_only", _mlp(PT2), {"dtype": "int8", "granularity": "per_channel"}),
    Case("digits MLP", "torch_export", "weight_only", _mlp(PT2), {"dtype": "int4", "group_size": 32}),
    Case("digits MLP", "torch_export", "weight_only", _mlp(PT2),
         {"bits": "auto", "group_size": 128, "max_size_ratio": 0.204}, datasets=("calibration", "evaluation")),
    Case("tiny Llama (random)", "hf", "weight_only", _tiny_llama, {"dtype": "int4", "group_size": 32},
         text_jsonl=True),
    Case("tiny Llama (random)", "hf", "weight_only", _tiny_llama, {"dtype": "int4", "algorithm": "gptq"},
         text_jsonl=True),
    Case("all-MiniLM-L6-v2", "hf", "weight_only", _minilm, {"dtype": "int8", "granularity": "per_channel"},
         text_jsonl=True),
    Case("all-MiniLM-L6-v2", "hf", "weight_only", _minilm, {"dtype": "int4", "group_size": 32}, text_jsonl=True),
    # issue 14 on hf: int4 (blocks of 128) with a cosine target (layers raised to int8), and bits auto under 0.6
    Case("all-MiniLM-L6-v2", "hf", "weight_only", _minilm, {"dtype": "int4", "group_size": 128}, text_jsonl=True),
    Case("all-MiniLM-L6-v2", "hf", "weight_only", _minilm,
         {"dtype": "int4", "group_size": 128, "target": {"metric": "cosine", "max_drop": 0.02}}, text_jsonl=True),
    Case("all-MiniLM-L6-v2", "hf", "weight_only", _minilm, {"bits": "auto", "max_size_ratio": 0.6},
         datasets=("calibration", "evaluation"), text_jsonl=True),
    Case("all-MiniLM-L6-v2", "hf", "auto", _minilm, text_jsonl=True),
]


def _datasets(tmp: Path, case: Case) -> dict[str, Path]:
    if case.text_jsonl:
        texts = hf_models.write_text_dataset(tmp / "texts.jsonl", 64)
        return {"evaluation_path": texts, "calibration_path": texts}
    if case.minilm_input:  # the same 64 sentences calibrate, where the case asks for calibration
        sentences = models.minilm_dataset(tmp / "sentences.npz")
        return {f"{role}_path": sentences for role in case.datasets if role in ("calibration", "evaluation")}
    x_train, _, x_test, y_test = models.digits_data_32() if case.digits32 else models.digits_data()
    if case.text_input:
        return {"evaluation_path": models.save_npz(tmp / "tokens.npz", input_ids=models.token_ids(64))}
    paths = {"calibration": lambda: models.save_npz(tmp / "cal.npz", x=x_train[:256]),
             "training": lambda: models.save_npz(tmp / "train.npz", x=x_train),
             "evaluation": lambda: models.save_npz(tmp / "eval.npz", x=x_test, labels=y_test)}
    return {f"{role}_path": paths[role]() for role in case.datasets}


def run_case(case: Case, tmp: Path) -> dict[str, Any]:
    suffix = {"onnx": ".onnx", "torchscript": ".pt", "torch_export": ".pt2", "hf": ".zip"}[case.fmt]
    model_path = case.build(tmp / f"model{suffix}")
    started = time.perf_counter()
    result = engine.quantize(model_path, case.fmt, case.method, case.config, tmp / "work", **_datasets(tmp, case))
    seconds = time.perf_counter() - started
    m = result.metrics
    accuracy, perplexity = m.get("accuracy") or {}, m.get("perplexity") or {}
    return {"model": case.label, "format": case.fmt, "method": case.method, "config": case.config,
            "size_ratio": m["size"]["ratio"],
            "top1": f"{accuracy['float']:.3f}->{accuracy['quantized']:.3f}" if accuracy else None,
            "perplexity": f"{perplexity['float']:.1f}->{perplexity['quantized']:.1f}" if perplexity else None,
            "cosine": m["fidelity"].get("cosine"), "cosine_min": m["fidelity"].get("cosine_min"),
            "speedup": m["latency"].get("speedup"), "vs_float_aoti": _vs_float_aoti(result.report),
            "runtime": m["latency"].get("runtime"), "engine_s": round(seconds, 1),
            "artifacts": [a.filename for a in result.artifacts], "warnings": m.get("warnings", []),
            "kept_float": (m.get("target") or {}).get("kept_float"),
            "kept_int8": (m.get("target") or {}).get("kept_int8"),
            "suggested_exclude": (m.get("sensitivity") or {}).get("suggested_exclude"),
            "bits_auto": _bits_auto(result.report), "sweep": _sweep(m.get("sweep")),
            "error": None if result.error is None else result.error["code"]}


def _bits_auto(report: dict[str, Any]) -> dict[str, Any] | None:
    """bits auto: both ends of the trade (all-4-bit, all-8-bit) beside what was delivered, without the layer list."""
    auto = next((r["bits_auto"] for key, r in report.items() if key.endswith("_weight_only") and isinstance(r, dict)
                 and r.get("bits_auto")), None)
    return {k: v for k, v in auto.items() if k != "layers"} if auto else None


def _sweep(sweep: dict[str, Any] | None) -> dict[str, Any] | None:
    """method auto: the pick, why, and each candidate's row without its config and warnings."""
    if not sweep:
        return None
    rows = [{k: v for k, v in c.items() if k not in ("config", "warnings")} for c in sweep["candidates"]]
    return {"recommended": sweep["recommended"], "why": sweep["why"], "candidates": rows}


def _vs_float_aoti(report: dict[str, Any]) -> float | None:
    """int8 AOTInductor package vs the float model compiled the same way, where the method built both."""
    for section in report.values():
        if isinstance(section, dict) and isinstance(section.get("aoti"), dict):
            return (section["aoti"].get("vs_float_compiled") or {}).get("speedup")
    return None


def _speed(row: dict[str, Any]) -> str:
    aoti = row.get("vs_float_aoti")
    return f"{row['speedup']} ({aoti}x vs float AOTI)" if aoti is not None else str(row["speedup"])


def _quality(row: dict[str, Any]) -> str:
    if row["top1"]:
        return row["top1"]
    return f"ppl {row['perplexity']}" if row["perplexity"] else ""


def main(argv: list[str]) -> int:
    console = Console()
    listed = {(c.fmt, c.method) for c in CASES}
    missing = sorted(f"{f}/{m}" for f, m in SPECS if (f.value, m.value) not in listed)
    wanted = [w.lower() for w in argv]
    cases = [c for c in CASES if not wanted or any(w in f"{c.fmt}/{c.method} {c.label}".lower() for w in wanted)]
    rows = []
    with Progress(console=console) as progress:
        task = progress.add_task("benchmark", total=len(cases))
        for case in cases:
            progress.update(task, description=f"{case.fmt}/{case.method} {case.label}")
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    rows.append(run_case(case, Path(tmp)))
                except Exception as exc:  # a failing case is a result too: report it, keep going
                    rows.append({"model": case.label, "format": case.fmt, "method": case.method,
                                 "error": f"{exc.__class__.__name__}: {exc}"[:300]})
            progress.advance(task)
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    # a filtered run leaves the full run's table alone
    (out / ("engine.filtered.json" if wanted else "engine.json")).write_text(json.dumps(rows, indent=2))
    print("| format/method | model | config | size | top-1 (or perplexity) float->quantized | cosine mean/min "
          "| speed-up | runtime | engine s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("error") and "size_ratio" not in r:
            print(f"| {r['format']}/{r['method']} | {r['model']} | | failed: {r['error']} | | | | | |")
            continue
        kept = "".join(f" (kept {how}: {', '.join(r[key])})" for key, how in (("kept_int8", "int8"),
                                                                               ("kept_float", "float")) if r.get(key))
        config = json.dumps(r["config"]) if r["config"] else ""
        print(f"| {r['format']}/{r['method']} | {r['model']}{kept} | {config} | "
              f"{r['size_ratio']:.3f} | {_quality(r)} | {r['cosine']} / {r['cosine_min']} | {_speed(r)} | "
              f"{r['runtime']} | {r['engine_s']} |")
    for r in rows:
        if r.get("sweep"):
            print(f"\n{r['model']} method auto: {r['sweep']['why']}\n\n| candidate | size | cosine | top-1 agreement "
                  "| accuracy | ms p50 | speed-up | drop | meets | Pareto | seconds | error |\n" + "|---" * 12 + "|")
            for c in r["sweep"]["candidates"]:
                f, lat, err = c["fidelity"] or {}, c["latency"] or {}, c["error"] or {}
                mark = "**" if c["recommended"] else ""
                print(f"| {mark}{c['name']}{mark} | {c['size_ratio']} | {f.get('cosine')} | {f.get('top1_agreement')} "
                      f"| {f.get('accuracy')} | {lat.get('ms_p50')} | {lat.get('speedup')} | {c['drop']} | "
                      f"{c['meets_target']} | {c['pareto']} | {c['seconds']} | {err.get('code', '')} |")
    if missing and not wanted:
        print(f"\nregistered but not benchmarked: {', '.join(missing)}")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
