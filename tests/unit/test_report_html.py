"""report.html from a job's report: hostile names stay text, charts are valid SVG, the page needs no network and
renders in headless Chromium without a console error."""

from __future__ import annotations

import base64
import copy
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from app.routes.reports import CSP as ROUTE_CSP
from tests.browser import Browser
from worker.engine import report_html

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)> $\\alpha$ & \'q\' ]]> --> {{7*7}}'
REPORT: dict[str, Any] = {
    "job_id": "01a2-job", "format": "onnx", "method": "static", "device": "cpu",
    "config": {"exclude": [HOSTILE], "calibration": {"algorithm": "entropy"}},
    "metrics": {
        "size": {"original_bytes": 1204936, "quantized_bytes": 321571, "ratio": 0.2669},
        "fidelity": {"source": "evaluation", "samples": 64, "sqnr_db": 37.1, "cosine": 0.9999, "top1_agreement": 1.0,
                     "outputs": [{"name": HOSTILE, "sqnr_db": 37.1, "cosine": 0.9999, "cosine_min": 0.9997,
                                  "collapsed_to_zero": False},
                                 {"name": "boxes", "sqnr_db": 12.0, "cosine": 0.97, "cosine_min": 0.9,
                                  "collapsed_to_zero": False}]},
        "accuracy": {"metric": "top1", "float": 0.975, "quantized": 0.972, "delta": -0.003},
        "perplexity": None,
        "latency": {"device": "cpu", "runtime": "onnxruntime 1.32.0", "batch_size": 1, "threads": 1,
                    "float_ms_p50": 0.25, "quantized_ms_p50": 0.1, "speedup": 2.5, "runs": 200},
        "layers": [{"name": HOSTILE, "op": "Gemm", "weight_dtype": "int8", "activation_dtype": "uint8",
                    "sqnr_db": 39.3},
                   {"name": "/2/Gemm", "op": "Gemm", "weight_dtype": "int4", "activation_dtype": None,
                    "sqnr_db": 21.5},
                   {"name": "/4/Softmax", "op": "Softmax", "weight_dtype": None, "sqnr_db": None}],
        "duration_s": 6.1,
        "warnings": [HOSTILE, "int8 is slower than float on this CPU"]},
    "versions": {"python": "3.11", "onnxruntime": "1.32.0"}, "host": {"model": "AMD EPYC"},
}
ARTIFACTS = [{"kind": "model", "filename": 'a".onnx', "format": "onnx"},
             {"kind": "report", "filename": "report.json", "format": None}]


class Elements(HTMLParser):
    """Every start tag and attribute the browser's parser would see."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def svgs(page: str) -> list[str]:
    return [base64.b64decode(m).decode() for m in re.findall(r"data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)", page)]


def test_hostile_names_and_messages_are_text_never_markup() -> None:
    page = report_html.render(REPORT, model_name=HOSTILE, job_name=HOSTILE, artifacts=ARTIFACTS)
    parser = Elements()
    parser.feed(page)
    tags = [tag for tag, _ in parser.tags]
    assert "script" not in tags
    assert all(not name.startswith("on") for _, attrs in parser.tags for name in attrs)
    assert all(attrs.get("src", "").startswith("data:image/svg+xml;base64,") for tag, attrs in parser.tags
               if tag == "img")
    assert tags.count("img") == 2  # the comparison and the per-layer chart
    escaped = HOSTILE.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    assert page.count(escaped.replace("'", "&#x27;")) >= 5  # title, summary, warning, layer row, output row


def test_charts_are_well_formed_svg_holding_the_layer_names_as_text() -> None:
    comparison, layers = svgs(report_html.render(REPORT, model_name="m"))
    for svg in (comparison, layers):
        root = ET.fromstring(svg.split("?>", 1)[1].split("]>", 1)[-1] if "<!DOCTYPE" in svg else svg)
        assert root.tag.endswith("svg")
        assert not [e for e in root.iter() if e.tag.endswith("script") or e.tag.endswith("foreignObject")]
    assert "float" in comparison and "quantized" in comparison and "Latency" in comparison
    texts = " ".join(e.text or "" for e in ET.fromstring(layers.split("]>", 1)[-1]).iter() if e.text)
    assert HOSTILE[-30:] in texts  # the name shown as the user wrote it ($ not read as math), its end kept
    assert "/2/Gemm" in texts and "/4/Softmax" not in texts  # a layer that stayed float has no bar


def test_the_same_report_gives_the_same_bytes() -> None:
    first = report_html.render(REPORT, model_name="m")
    assert report_html.render(copy.deepcopy(REPORT), model_name="m") == first


def test_the_page_forbids_scripts_and_network_like_the_route_does() -> None:
    page = report_html.render(REPORT, model_name="m")
    assert f'content="{report_html.CSP}"' in page
    assert ROUTE_CSP.startswith(report_html.CSP) and "script-src" not in ROUTE_CSP
    assert not re.search(r"(src|href)=\"(https?:)?//", page)


def test_many_layers_chart_the_worst_and_say_so_and_sensitivity_gets_its_column() -> None:
    report = copy.deepcopy(REPORT)
    report["metrics"]["layers"] = [{"name": f"layer.{i}", "op": "MatMul", "weight_dtype": "int4",
                                    "sqnr_db": 10.0 + i % 97, "sensitivity": 1.0 / (1 + i)} for i in range(300)]
    page = report_html.render(report, model_name="m")
    assert "The chart shows the 60 layers with the lowest SQNR; 240 more are in the table." in page
    assert ">sensitivity</th>" in page
    layers_svg = svgs(page)[1]
    assert "sensitivity" in layers_svg and "layer.0<" in layers_svg and "layer.96<" not in layers_svg


@pytest.mark.parametrize("fmt, kind, expected", [
    ("onnx", "model", "ort.InferenceSession"), ("torch_export", "model", "torch.export.load"),
    ("torch_export", "compiled_model", "aoti_load_package"), ("torchscript", "model", "torch.jit.load")])
def test_each_format_says_how_to_load_its_artifact(fmt: str, kind: str, expected: str) -> None:
    page = report_html.render({**REPORT, "format": fmt}, artifacts=[{"kind": kind, "filename": 'x".bin'}])
    assert expected in page and "&quot;x\\&quot;.bin&quot;" in page  # the name as a valid, escaped literal


def test_a_method_s_own_loader_snippet_is_used() -> None:
    report = {**REPORT, "format": "hf", "loader": "from transformers import AutoModel  # <hf>"}
    page = report_html.render(report, artifacts=ARTIFACTS)
    assert "from transformers import AutoModel  # &lt;hf&gt;" in page and "InferenceSession" not in page


def test_a_report_without_measurements_still_renders() -> None:
    page = report_html.render({"format": "onnx", "method": "dynamic", "metrics": {}}, model_name="m")
    assert "not measured for this job" in page and "No warnings." in page and "<img" not in page


def test_the_page_renders_in_headless_chromium_without_console_errors(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    report_html.write(REPORT, page, model_name=HOSTILE, job_name="nightly", artifacts=ARTIFACTS)
    with Browser() as browser:
        browser.open(page.as_uri())
        assert browser.console_errors() == []
        assert browser.evaluate("document.title") == f"quantserve report: {HOSTILE}: onnx static"
        assert browser.evaluate("document.getElementById('title').textContent") == f"{HOSTILE}: onnx static"
        assert browser.evaluate("document.scripts.length") == 0
        charts = browser.evaluate("[...document.images].map(i => [i.id, i.complete, i.naturalWidth])")
        assert [c[0] for c in charts] == ["chart-comparison", "chart-layers"]
        assert all(done and width > 300 for _, done, width in charts), charts  # decoded: the SVG is valid
        assert browser.evaluate("document.querySelectorAll('#warnings li').length") == 2
        shot = browser.screenshot(Path(tempfile.gettempdir()) / "quantserve-report-hostile.png")
    assert shot.stat().st_size > 20_000


def test_the_api_serves_pages_without_importing_matplotlib() -> None:
    code = "import sys, app.main; app.main.create_app(); print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _with_sensitivity(drops: list[float]) -> dict[str, Any]:
    """REPORT with metrics.sensitivity shaped as ONNX dynamic/static write it (worker/engine/onnx/sensitivity.py)."""
    report = copy.deepcopy(REPORT)
    names = [HOSTILE, "/2/Gemm"]
    report["metrics"]["sensitivity"] = {
        "method": "measured: each layer quantized alone", "source": "evaluation", "samples": 64,
        "goal": {"metric": "accuracy", "max_drop": 0.01, "relative": True},
        "layers": [{"name": n, "op": "Gemm", "drop": d, "cosine": 0.999 - i / 100, "accuracy": 0.9}
                   for i, (n, d) in enumerate(zip(names, drops, strict=True))],
        "suggested_exclude": [f"^{re.escape(HOSTILE)}$"], "suggested_reaches_goal": True}
    return report


def test_measured_sensitivity_joins_the_layers_by_name_with_what_it_measures() -> None:
    page = report_html.render(_with_sensitivity([0.0, 0.03125]), model_name="m")
    rows = re.findall(r"<tr><td>(.*?)</td>.*?<td class=num>([^<]*)</td><td class=num>([^<]*)</td></tr>", page)
    assert [(sqnr, sens) for _, sqnr, sens in rows] == [("39.3", "0"), ("21.5", "0.03125"), ("", "")]
    assert "drop in accuracy with only this layer quantized" in svgs(page)[1]
    assert "Suggested exclude (keep these float): <code>^" in page and "<script>" not in page
    assert "reaches the goal" in page


def test_when_no_single_layer_moves_the_goal_metric_sensitivity_falls_back_to_cosine() -> None:
    page = report_html.render(_with_sensitivity([0.0, 0.0]), model_name="m")
    assert "1 - cosine to float with only this layer quantized" in svgs(page)[1]
    assert "<td class=num>0.001</td>" in page and "<td class=num>0.011</td>" in page
