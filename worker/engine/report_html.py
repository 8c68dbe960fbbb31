"""report.html: one self-contained page per job (summary, float-vs-quantized charts, layers, warnings, loading).

Everything is inline (CSS, SVG charts as data: images) and the page carries a Content-Security-Policy that allows no
script and no network at all, so it reads the same from the API, a download folder or a CI artifact store. Every
value that comes from the user or the model (model, job, layer and output names, warnings, config) is escaped.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from worker.engine import report_charts

# No script of any origin, no fetch, no frames; inline styles and data: images only. The API sends the same
# policy as a header (app/routes/reports.py); this copy protects a saved file.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
MAX_TABLE_LAYERS = 500

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#111827;margin:0;background:#f8fafc}
main{max-width:980px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb}
.muted{color:#6b7280}tr.recommended td{background:#ecfdf5}.tiles{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.tile{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:10px 14px;min-width:150px}
.tile b{display:block;font-size:20px}table{border-collapse:collapse;background:#fff;width:100%}
td,th{border:1px solid #e5e7eb;padding:4px 8px;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{background:#f1f5f9}td.num{text-align:right;font-variant-numeric:tabular-nums}
.chart{max-width:100%;height:auto;background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:6px}
pre{background:#0f172a;color:#e2e8f0;padding:12px;border-radius:8px;overflow:auto;white-space:pre-wrap}
.warn{background:#fffbeb;border:1px solid #fcd34d;border-radius:8px;padding:8px 12px 8px 28px}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "" if value is None else str(value)


def _img(svg: str | None, element_id: str, alt: str) -> str:
    if svg is None:
        return f'<p class="muted">{esc(alt)}: not measured for this job.</p>'
    data = base64.b64encode(svg.encode()).decode()
    return f'<img class="chart" id="{element_id}" alt="{esc(alt)}" src="data:image/svg+xml;base64,{data}">'


def find_loaders(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every `loader` snippet a method put in the report (hf, int4 cuda): (where, code)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "loader" and isinstance(value, str):
                yield path or "report", value
            else:
                yield from find_loaders(value, f"{path}.{key}" if path else str(key))


def generic_loader(fmt: str | None, kind: str, filename: str) -> str | None:
    """How to run an artifact that came without its own snippet, in the runtime it was measured in."""
    name = json.dumps(filename, ensure_ascii=False)  # a valid Python string literal, whatever the name holds
    if fmt == "onnx":
        return ("import onnxruntime as ort\n"
                f"session = ort.InferenceSession({name}, providers=[\"CPUExecutionProvider\"])\n"
                "feeds = {i.name: x for i, x in zip(session.get_inputs(), [x])}  # your inputs, as numpy arrays\n"
                "outputs = session.run(None, feeds)")
    if kind == "compiled_model":
        return ("import torch\n"
                f"model = torch._inductor.aoti_load_package({name})  # AOTInductor: same CPU ISA, same torch\n"
                "with torch.no_grad():\n    y = model(x)")
    if fmt == "torch_export":
        return (f"import torch\nprogram = torch.export.load({name})  # torch alone: no torchao needed\n"
                "model = program.module()\nwith torch.no_grad():\n    y = model(x)")
    if fmt == "torchscript":
        return f"import torch\nmodel = torch.jit.load({name})\nwith torch.no_grad():\n    y = model(x)"
    return None


def _tiles(metrics: Mapping[str, Any]) -> str:
    tiles = []
    size, latency = metrics.get("size") or {}, metrics.get("latency") or {}
    fidelity, accuracy = metrics.get("fidelity") or {}, metrics.get("accuracy") or {}
    if isinstance(size.get("ratio"), int | float) and size["ratio"] > 0:
        tiles.append((f"{1 / size['ratio']:.2f}× smaller", f"{size.get('quantized_bytes', 0):,} of "
                                                            f"{size.get('original_bytes', 0):,} bytes"))
    if isinstance(latency.get("speedup"), int | float):
        tiles.append((f"{latency['speedup']:.2f}× speed", f"{_fmt(latency.get('float_ms_p50'))} → "
                                                          f"{_fmt(latency.get('quantized_ms_p50'))} ms p50"))
    if isinstance(fidelity.get("sqnr_db"), int | float):
        tiles.append((f"{fidelity['sqnr_db']:.1f} dB SQNR", f"cosine {_fmt(fidelity.get('cosine'), 6)}, "
                                                            f"{fidelity.get('source', '?')} inputs"))
    if isinstance(accuracy.get("delta"), int | float):
        tiles.append((f"{accuracy['delta']:+.4f} {accuracy.get('metric', 'accuracy')}",
                      f"{_fmt(accuracy.get('float'))} → {_fmt(accuracy.get('quantized'))}"))
    body = "".join(f'<div class="tile"><b>{esc(big)}</b><span class="muted">{esc(small)}</span></div>'
                   for big, small in tiles)
    return f'<div class="tiles" id="headline">{body}</div>'


def _latency_setup(latency: Mapping[str, Any]) -> str | None:
    if not latency:
        return None
    return (f"{latency.get('runtime', '?')}, batch {latency.get('batch_size', '?')}, "
            f"{latency.get('threads', '?')} thread(s), {latency.get('runs', '?')} runs")


def _rows(pairs: Sequence[tuple[str, Any]]) -> str:
    return "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in pairs if v not in (None, ""))


def with_sensitivity(layers: Sequence[Mapping[str, Any]], sensitivity: Any) -> tuple[list[dict[str, Any]], str]:
    """metrics.layers, each with its measured `sensitivity` from metrics.sensitivity (matched by layer name), and
    what that number is. The drop in the goal's metric when only that layer is quantized; where no single layer
    moves it (a coarse metric such as top-1 on few samples), 1 - cosine instead, which still ranks them."""
    label = "sensitivity: higher = quantizing it hurts more"
    if not isinstance(sensitivity, Mapping) or not isinstance(sensitivity.get("layers"), list):
        return [dict(layer) for layer in layers], label
    ranked = {str(r.get("name")): r for r in sensitivity["layers"] if isinstance(r, Mapping)}
    metric = str((sensitivity.get("goal") or {}).get("metric") or "fidelity")
    use_drop = any(isinstance(r.get("drop"), int | float) and r["drop"] > 0 for r in ranked.values())

    def value(row: Mapping[str, Any]) -> float | None:
        if use_drop:
            return row.get("drop")
        return round(1.0 - row["cosine"], 8) if isinstance(row.get("cosine"), int | float) else None

    label = (f"drop in {metric} with only this layer quantized" if use_drop
             else "1 - cosine to float with only this layer quantized")
    merged = [{**layer, "sensitivity": value(ranked[str(layer.get("name"))])} if str(layer.get("name")) in ranked
              else dict(layer) for layer in layers]
    return merged, label


def _sensitivity_note(sensitivity: Any) -> str:
    if not isinstance(sensitivity, Mapping):
        return ""
    suggested = sensitivity.get("suggested_exclude") or []
    goal = sensitivity.get("goal") or {}
    reach = {True: "reaches", False: "does not reach"}.get(sensitivity.get("suggested_reaches_goal"), "?")
    text = (f"Sensitivity: {sensitivity.get('method', '')}. Goal: {goal.get('metric', '?')} drop at most "
            f"{goal.get('max_drop', '?')}{' (relative)' if goal.get('relative') else ''}. ")
    keep = ("Suggested exclude (keep these float): " + ", ".join(f"<code>{esc(x)}</code>" for x in suggested)
            + f" &mdash; {reach} the goal.") if suggested else "No layer needs to stay float for the goal."
    return f'<p class="muted" id="sensitivity">{esc(text)}{keep}</p>'


def _layers_section(layers: Sequence[Mapping[str, Any]], sensitivity: Any = None) -> str:
    if not layers:
        return '<p class="muted">This method reports no per-layer figures.</p>'
    layers, label = with_sensitivity(layers, sensitivity)
    charted, left_out, kept_float = report_charts.layer_rows(layers)
    notes = []
    if left_out:
        notes.append(f"The chart shows the {len(charted)} layers with the lowest SQNR; {left_out} more are in the "
                     "table.")
    if kept_float:
        notes.append(f"{kept_float} layer(s) stayed float or were not measured (no SQNR).")
    has_sensitivity = any("sensitivity" in layer for layer in layers)
    head = "<tr><th>layer</th><th>op</th><th>weights</th><th>activations</th><th>SQNR (dB)</th>" + (
        f'<th title="{esc(label)}">sensitivity</th>' if has_sensitivity else "") + "</tr>"
    body = "".join(
        f"<tr><td>{esc(layer.get('name', ''))}</td><td>{esc(layer.get('op') or '')}</td>"
        f"<td>{esc(layer.get('weight_dtype') or 'float')}</td><td>{esc(layer.get('activation_dtype') or '')}</td>"
        f"<td class=num>{esc(_fmt(layer.get('sqnr_db')))}</td>"
        + (f"<td class=num>{esc(_fmt(layer.get('sensitivity')))}</td>" if has_sensitivity else "") + "</tr>"
        for layer in layers[:MAX_TABLE_LAYERS])
    if len(layers) > MAX_TABLE_LAYERS:
        notes.append(f"The table lists the first {MAX_TABLE_LAYERS} of {len(layers)} layers; report.json has all.")
    return (_img(report_charts.layers_svg(layers, label), "chart-layers", "Per-layer SQNR chart")
            + "".join(f'<p class="muted">{esc(n)}</p>' for n in notes) + _sensitivity_note(sensitivity)
            + f'<table id="layers">{head}{body}</table>')


def _sweep_section(sweep: Any) -> str:
    """method auto: every candidate's size, fidelity and latency, the Pareto front and the pick, with why."""
    if not isinstance(sweep, Mapping) or not isinstance(sweep.get("candidates"), list):
        return ""
    rows = []
    for c in sweep["candidates"]:
        if not isinstance(c, Mapping):
            continue
        fidelity, latency, error = c.get("fidelity") or {}, c.get("latency") or {}, c.get("error") or {}
        marks = ", ".join(m for m, on in (("recommended", c.get("recommended")), ("Pareto", c.get("pareto")),
                                          ("meets target", c.get("meets_target"))) if on)
        cells = [_fmt(c.get("size_ratio")), _fmt(fidelity.get("cosine"), 6), _fmt(fidelity.get("top1_agreement")),
                 _fmt(fidelity.get("accuracy")), _fmt(latency.get("ms_p50")), _fmt(latency.get("speedup")),
                 _fmt(c.get("drop"))]
        rows.append(f'<tr{" class=recommended" if c.get("recommended") else ""}><td>{esc(c.get("name", ""))}</td>'
                    + "".join(f"<td class=num>{esc(v)}</td>" for v in cells)
                    + f"<td>{esc(marks)}</td><td>{esc(error.get('message', '') if error else '')}</td></tr>")
    goal = sweep.get("target") or {}
    return ('<h2>Method sweep</h2><table id="sweep"><tr><th>candidate</th><th>size</th><th>cosine</th>'
            "<th>top-1 agreement</th><th>accuracy</th><th>ms p50</th><th>speed-up</th>"
            f'<th>{esc(goal.get("metric", "goal"))} drop</th><th></th><th>not delivered because</th></tr>'
            + "".join(rows) + f'</table><p class="muted" id="sweep-why">{esc(sweep.get("why", ""))}</p>')


def render(report: Mapping[str, Any], *, model_name: str = "", job_name: str | None = None,
           artifacts: Sequence[Mapping[str, Any]] = ()) -> str:
    """The page for one job's report.json (the dict the worker stores), and its artifacts ({kind, filename,
    format})."""
    metrics = report.get("metrics") or {}
    fidelity, latency = metrics.get("fidelity") or {}, metrics.get("latency") or {}
    title = f"{model_name or 'model'}: {report.get('format', '?')} {report.get('method', '?')}"
    summary = _rows([("model", model_name), ("job", job_name), ("job id", report.get("job_id")),
                     ("format / method / device",
                      f"{report.get('format', '?')} / {report.get('method', '?')} / {report.get('device', 'cpu')}"),
                     ("fidelity measured on", f"{fidelity.get('samples', '?')} {fidelity.get('source', '?')} samples"
                      if fidelity else None),
                     ("latency measured with", _latency_setup(latency)),
                     ("engine time", f"{metrics['duration_s']} s" if metrics.get("duration_s") is not None else None),
                     ("worker CPU", (report.get("host") or {}).get("model")),
                     ("versions", ", ".join(f"{k} {v}" for k, v in (report.get("versions") or {}).items()))])
    warnings = metrics.get("warnings") or []
    warning_html = ('<ul class="warn" id="warnings">' + "".join(f"<li>{esc(w)}</li>" for w in warnings) + "</ul>"
                    if warnings else '<p id="warnings" class="muted">No warnings.</p>')
    outputs = fidelity.get("outputs") or []
    outputs_html = "" if len(outputs) < 2 else (
        "<h3>Fidelity per output</h3><table><tr><th>output</th><th>SQNR (dB)</th><th>cosine</th><th>worst cosine</th>"
        "<th>collapsed to zero</th></tr>" + "".join(
            f"<tr><td>{esc(o.get('name', ''))}</td><td class=num>{esc(_fmt(o.get('sqnr_db')))}</td>"
            f"<td class=num>{esc(_fmt(o.get('cosine'), 6))}</td><td class=num>{esc(_fmt(o.get('cosine_min'), 6))}</td>"
            f"<td>{esc(o.get('collapsed_to_zero', ''))}</td></tr>" for o in outputs) + "</table>")
    snippets = [(f"{where} (from the method)", code) for where, code in find_loaders(report)]
    if not snippets:
        snippets = [(f"{a.get('filename')} ({a.get('kind')})", code) for a in artifacts if a.get("kind") != "report"
                    and (code := generic_loader(a.get("format") or report.get("format"), str(a.get("kind")),
                                                str(a.get("filename"))))]
    files = "".join(f"<li><code>{esc(a.get('filename'))}</code> <span class=muted>({esc(a.get('kind'))})</span></li>"
                    for a in artifacts)
    loading = (f"<ul>{files}</ul>" if files else "") + "".join(
        f'<p class="muted">{esc(where)}</p><pre class="loader">{esc(code)}</pre>' for where, code in snippets) or (
        '<p class="muted">No loader snippet for this format.</p>')
    config = json.dumps(report.get("config") or {}, indent=2, ensure_ascii=False, sort_keys=True)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>quantserve report: {esc(title)}</title><style>{STYLE}</style></head>
<body><main>
<h1 id="title">{esc(title)}</h1>
<p class="muted">Measured on the worker that produced the artifact, in the runtime that serves it.</p>
{_tiles(metrics)}
<h2>Summary</h2><table id="summary">{summary}</table>
<h2>Float against quantized</h2>
{_img(report_charts.comparison_svg(metrics), "chart-comparison", "Size, latency and fidelity: float vs quantized")}
{outputs_html}
{_sweep_section(metrics.get("sweep"))}
<h2>Warnings</h2>{warning_html}
<h2>Per-layer error</h2>{_layers_section(metrics.get("layers") or [], metrics.get("sensitivity"))}
<h2>How to load the artifact</h2>{loading}
<h2>Effective configuration</h2><pre id="config">{esc(config)}</pre>
</main></body></html>
"""


def write(report: Mapping[str, Any], path: Path, **kwargs: Any) -> Path:
    path.write_text(render(report, **kwargs), encoding="utf-8")
    return path
