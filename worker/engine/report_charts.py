"""report.html's charts as static SVG, drawn with matplotlib from a job's metrics; no pyplot, no global state."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

# Settings of every chart. text.parse_math off: layer and output names come from the user's model, and a "$" in
# one would otherwise be parsed as mathtext (an error, or text drawn differently from the name). svg.fonttype
# "none" keeps text as <text> (a tenth of the size of glyph paths, and selectable); matplotlib escapes it.
# hashsalt and no Date: the same metrics give the same bytes.
RC = {"text.parse_math": False, "svg.fonttype": "none", "svg.hashsalt": "quantserve", "font.size": 9,
      "font.family": "sans-serif", "axes.spines.top": False, "axes.spines.right": False}
FLOAT_COLOR, QUANT_COLOR = "#9aa5b1", "#2563eb"
DTYPE_COLORS = {"int4": "#7c3aed", "int8": "#2563eb", "uint8": "#2563eb", "float": "#9aa5b1"}
WIDTH_IN = 9.4  # about 900 px wide in a browser (SVG user units are points: 72 a inch, shown at 96 px a inch)
MAX_LAYERS = 60  # more bars than this are unreadable; the worst ones are shown and the page says so


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(
        value) else None


def short_name(name: str, width: int = 42) -> str:
    """The end of a long layer name: its last parts tell layers apart (…/layer.3/attention/q_proj)."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _svg(fig: Any) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return buffer.getvalue()


def _pairs(metrics: Mapping[str, Any]) -> list[tuple[str, str, float, float, str]]:
    """(title, unit, float value, quantized value, which is better) for each float-vs-quantized figure present."""
    pairs = []
    size = metrics.get("size") or {}
    original, quantized = _number(size.get("original_bytes")), _number(size.get("quantized_bytes"))
    if original is not None and quantized is not None:
        scale, unit = (1e6, "MB") if original >= 1e6 else (1e3, "kB")
        pairs.append(("Size", unit, original / scale, quantized / scale, "smaller is better"))
    latency = metrics.get("latency") or {}
    f_ms, q_ms = _number(latency.get("float_ms_p50")), _number(latency.get("quantized_ms_p50"))
    if f_ms is not None and q_ms is not None:
        pairs.append((f"Latency p50 ({latency.get('device', 'cpu')}, batch 1)", "ms", f_ms, q_ms,
                      "smaller is better"))
    accuracy = metrics.get("accuracy") or {}
    f_acc, q_acc = _number(accuracy.get("float")), _number(accuracy.get("quantized"))
    if f_acc is not None and q_acc is not None:
        pairs.append((f"Accuracy ({accuracy.get('metric', 'top1')})", "", f_acc, q_acc, "larger is better"))
    perplexity = metrics.get("perplexity") or {}
    f_ppl, q_ppl = _number(perplexity.get("float")), _number(perplexity.get("quantized"))
    if f_ppl is not None and q_ppl is not None:
        pairs.append(("Perplexity", "", f_ppl, q_ppl, "smaller is better"))
    fidelity = metrics.get("fidelity") or {}
    for key, title in (("cosine", "Output cosine to float"), ("top1_agreement", "Top-1 agreement with float")):
        value = _number(fidelity.get(key))
        if value is not None:  # the float model agrees with itself: 1.0 is its bar
            pairs.append((title, "", 1.0, value, "1 = identical to float"))
    return pairs


def comparison_svg(metrics: Mapping[str, Any]) -> str | None:
    """One small panel per figure (size, latency, accuracy or perplexity, fidelity): float against quantized."""
    pairs = _pairs(metrics)
    if not pairs:
        return None
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(RC):
        columns = 1 if len(pairs) < 3 else 2  # two panels a row: five stacked would be a tall, thin chart
        rows = math.ceil(len(pairs) / columns)
        fig = Figure(figsize=(WIDTH_IN, 1.15 * rows + 0.3), layout="constrained")
        axes = fig.subplots(rows, columns, squeeze=False).ravel()
        for ax in axes[len(pairs):]:
            ax.set_visible(False)
        for ax, (title, unit, f_value, q_value, better) in zip(axes, pairs, strict=False):
            bars = ax.barh([1, 0], [f_value, q_value], color=[FLOAT_COLOR, QUANT_COLOR], height=0.7)
            ax.set_yticks([1, 0], ["float", "quantized"])
            ax.set_title(f"{title}{f' ({unit})' if unit else ''}: {better}", loc="left", fontsize=9)
            top = max(f_value, q_value, 1e-12)
            ax.set_xlim(0, top * 1.22)
            for bar, value in zip(bars, (f_value, q_value), strict=True):
                ax.annotate(f"{value:.4g}", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                            xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
        return _svg(fig)


def layer_rows(layers: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], int, int]:
    """The layers to chart (model order), how many measured layers were left out, how many stayed float."""
    measured = [layer for layer in layers if _number(layer.get("sqnr_db")) is not None]
    kept_float = len(layers) - len(measured)
    if len(measured) <= MAX_LAYERS:
        return measured, 0, kept_float
    worst = sorted(range(len(measured)), key=lambda i: measured[i]["sqnr_db"])[:MAX_LAYERS]
    return [measured[i] for i in sorted(worst)], len(measured) - MAX_LAYERS, kept_float


def layers_svg(layers: Sequence[Mapping[str, Any]],
               sensitivity_label: str = "sensitivity: higher = quantizing it hurts more") -> str | None:
    """Per-layer SQNR (dB; higher is closer to float), coloured by weight dtype; each layer's `sensitivity` beside
    it when the job measured one."""
    rows, _, _ = layer_rows(layers)
    if not rows:
        return None
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    sensitivity = [_number(row.get("sensitivity")) for row in rows]
    has_sensitivity = any(value is not None for value in sensitivity)
    with matplotlib.rc_context(RC):
        height = 0.9 + 0.2 * len(rows)
        fig = Figure(figsize=(WIDTH_IN, height), layout="constrained")
        axes = fig.subplots(1, 2 if has_sensitivity else 1, sharey=True, squeeze=False,
                            width_ratios=[2, 1] if has_sensitivity else [1])[0]
        positions = list(range(len(rows)))[::-1]  # first layer on top
        dtypes = [str(row.get("weight_dtype") or "float") for row in rows]
        colors = [DTYPE_COLORS.get(d, "#0f766e") for d in dtypes]
        axes[0].barh(positions, [float(row["sqnr_db"]) for row in rows], color=colors, height=0.72)
        axes[0].set_yticks(positions, [short_name(str(row.get("name", "?"))) for row in rows], fontsize=7)
        axes[0].set_xlabel("SQNR of the layer's output against float (dB): higher is better")
        axes[0].set_ylim(-0.6, len(rows) - 0.4)
        legend = [Patch(color=DTYPE_COLORS.get(d, "#0f766e"), label=f"weights {d}") for d in dict.fromkeys(dtypes)]
        # outside the bars: inside, it would hide the ends of the last layers' bars
        axes[-1].legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
        if has_sensitivity:
            axes[1].barh(positions, [value or 0.0 for value in sensitivity], color="#dc2626", height=0.72)
            axes[1].set_xlabel(sensitivity_label)
            # tiny values (1 - cosine ~ 1e-5): plain tick labels, not an offset text that lands on the axis label
            axes[1].xaxis.set_major_locator(MaxNLocator(4))
            axes[1].xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.2g}"))
        return _svg(fig)
