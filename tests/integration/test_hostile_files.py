"""A corpus of hostile uploads, each built here, sent through the API to a real worker: every one is
refused (4xx or an `invalid` status with a message), and no payload ever runs."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import models
from tests.conftest import Service, wait_for


class _CreatesMarker:
    """Unpickling this creates the marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _zip_bomb_npz(path: Path) -> Path:
    """A 300 MiB array of zeros that deflates to ~300 KB (the test service caps datasets at 128 MiB)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (300 * 1024 * 1024 // 4,)})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf, zf.open("x.npy", "w") as out:
        out.write(header.getvalue())
        chunk = bytes(1024 * 1024)
        for _ in range(300):
            out.write(chunk)
    return path


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _malicious_pt2(tmp: Path, marker: Path) -> Path:
    clean = models.save_torch_export(models.train_digits_mlp(), torch.zeros(2, 1, 8, 8), tmp / "clean.pt2")
    evil = tmp / "evil.pt2"
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data/sample_inputs/model.pt"):
                data = pickle.dumps(_CreatesMarker(marker))
            dst.writestr(info, data)
    return evil


def _hf_tar_with_symlink(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        config = b'{"model_type": "bert"}'
        info = tarfile.TarInfo("model/config.json")
        info.size = len(config)
        tf.addfile(info, io.BytesIO(config))
        link = tarfile.TarInfo("model/model.safetensors")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    return path


def _hf_with_custom_code(tmp: Path, marker: Path) -> Path:
    """A real safetensors folder whose config asks transformers to import the upload's own evil.py."""
    import json

    from tests import hf_models

    folder = hf_models.tiny_llama_folder(tmp / "custom-code", layers=1, tokenizer=False)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["EvilLlama"], auto_map={"AutoModelForCausalLM": "evil.EvilLlama"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return hf_models.zip_folder(folder, tmp / "custom-code.zip")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[str, Path]]]:
    tmp = tmp_path_factory.mktemp("hostile")
    marker = tmp / "PAYLOAD_RAN"
    torch.save({"w": torch.zeros(2)}, tmp / "weights.pt")
    torch.save(_CreatesMarker(marker), tmp / "evil_torch_save.pt")
    (tmp / "renamed.pt2").write_bytes((tmp / "evil_torch_save.pt").read_bytes())
    onnx_path = models.export_onnx(models.train_digits_mlp(), torch.zeros(2, 1, 8, 8), tmp / "ok.onnx")
    (tmp / "truncated.onnx").write_bytes(onnx_path.read_bytes()[: onnx_path.stat().st_size // 2])
    (tmp / "random.onnx").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp / "plain.pkl").write_bytes(pickle.dumps(_CreatesMarker(marker)))
    files = {
        # name: (what it is uploaded as, path)
        "plain pickle": ("model", tmp / "plain.pkl"),
        "torch.save pickle in a zip": ("model", tmp / "evil_torch_save.pt"),
        "weights-only torch.save": ("model", tmp / "weights.pt"),
        "torch.save renamed .pt2": ("model", tmp / "renamed.pt2"),
        "truncated onnx": ("model", tmp / "truncated.onnx"),
        "random bytes": ("model", tmp / "random.onnx"),
        "hf tar with a symlink": ("model", _hf_tar_with_symlink(tmp / "hf.tar.gz")),
        "pickle inside a zip": ("model", _zip(tmp / "pz.zip",
                                              {"archive/data.pkl": pickle.dumps(_CreatesMarker(marker))})),
        "npz zip bomb": ("dataset", _zip_bomb_npz(tmp / "bomb.npz")),
        "npz object array": ("dataset", _zip(tmp / "obj.npz", {"x.npy": _npy(np.array([_CreatesMarker(marker)],
                                                                                    dtype=object))})),
        "npz path traversal": ("dataset", _zip(tmp / "trav.npz", {"../../evil.npy": _npy(np.zeros(3, "f4"))})),
        "npz arrays disagree in length": ("dataset", _zip(tmp / "len.npz", {"a.npy": _npy(np.zeros((5, 2), "f4")),
                                                                            "b.npy": _npy(np.zeros((4, 2), "f4"))})),
        "jsonl with bad utf-8": ("dataset", tmp / "bad.jsonl"),
        "hf with custom code": ("model", _hf_with_custom_code(tmp, marker)),
    }
    (tmp / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    return marker, files


def test_hostile_uploads_are_refused_and_never_executed(service: Service, corpus) -> None:
    marker, files = corpus
    client = service.client("hostile")
    outcomes = {}
    for name, (kind, path) in files.items():
        response = client.put(f"/v1/{kind}s/upload", params={"name": name}, content=path.read_bytes())
        if response.status_code == 201:
            body = wait_for(client, f"/v1/{kind}s/{response.json()['id']}", until=("ready", "invalid"))
            outcomes[name] = (body["status"], (body["error"] or {}).get("message", ""))
        else:
            assert response.headers["content-type"].startswith("application/problem+json")
            outcomes[name] = (response.status_code, response.json()["detail"])
    for name, (outcome, message) in outcomes.items():
        assert outcome in (400, 413, 415, 422, "invalid"), f"{name} was accepted: {outcome}"
        assert len(message) > 15, f"{name}: the message does not say what is wrong: {message!r}"
    assert "past" in outcomes["npz zip bomb"][1] or "larger" in outcomes["npz zip bomb"][1], outcomes["npz zip bomb"]
    assert "custom code" in outcomes["hf with custom code"][1], outcomes["hf with custom code"]
    assert not marker.exists(), "a payload ran"
    store = service.data_dir.resolve()
    assert not (store.parent / "evil.npy").exists() and not (store / "evil.npy").exists()


def test_pt2_with_pickled_sample_inputs_is_used_without_unpickling(service: Service, tmp_path: Path) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    client = service.client("hostile")
    response = client.put("/v1/models/upload", params={"name": "evil.pt2"},
                          content=_malicious_pt2(tmp_path, marker).read_bytes())
    assert response.status_code == 201
    model = wait_for(client, f"/v1/models/{response.json()['id']}", until=("ready", "invalid"))
    assert model["status"] == "ready" and model["format"] == "torch_export"
    job = client.post("/v1/jobs", json={"model_id": model["id"], "method": "dynamic"}).json()
    assert wait_for(client, f"/v1/jobs/{job['id']}", until=("succeeded", "failed"))["status"] == "succeeded"
    assert not marker.exists()
