"""A corpus of hostile uploads, each built here, sent through the API to a real worker: every one is
refused (4xx or an `invalid` status with a message), and no payload ever runs."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import uuid
import zipfile
from pathlib import Path
from urllib.parse import quote

import httpx
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


# Names that would break a response header or a log line if they were stored and echoed: refused at upload,
# by both upload forms, with a 422 that names the field. Other Unicode is a name like any other.
HEADER_BREAKING_NAMES = {"crlf": "a\r\nX-Injected: 1", "nul": "a\x00b", "bidi override": "report\u202efdp.exe",
                         "10,000 characters": "x" * 10_000}
UNICODE_NAME = "модель-量化-🙂"
UPLOAD_FORMS = ("multipart", "raw")


@pytest.fixture(scope="module")
def small_uploads() -> dict[str, bytes]:
    """A valid model (one ONNX Identity node) and a valid dataset (one line of text), per kind."""
    import onnx
    from onnx import helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])])
    return {"model": helper.make_model(graph).SerializeToString(), "dataset": b'{"text": "hello"}\n'}


def _upload(client: httpx.Client, kind: str, form: str, content: bytes, name: str) -> httpx.Response:
    if form == "multipart":
        return client.post(f"/v1/{kind}s", files={"file": ("upload.bin", content)}, data={"name": name})
    return client.put(f"/v1/{kind}s/upload", params={"name": name}, content=content)


@pytest.mark.parametrize("form", UPLOAD_FORMS)
@pytest.mark.parametrize("kind", ["model", "dataset"])
@pytest.mark.parametrize("name", HEADER_BREAKING_NAMES.values(), ids=HEADER_BREAKING_NAMES.keys())
def test_a_header_breaking_or_overlong_name_is_422_naming_the_field(service: Service, small_uploads, kind: str,
                                                                    form: str, name: str) -> None:
    client = service.client("names")
    response = _upload(client, kind, form, small_uploads[kind], name)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["code"] == "validation_error"
    [error] = problem["errors"]
    assert error["loc"] == (["body", "name"] if form == "multipart" else ["query", "name"])
    assert ("characters" in error["msg"] or "U+" in error["msg"]), error["msg"]
    assert "x-injected" not in response.headers
    stored = client.get(f"/v1/{kind}s", params={"limit": 200}).json()["items"]
    assert name not in [row["name"] for row in stored]


@pytest.mark.parametrize("form", UPLOAD_FORMS)
@pytest.mark.parametrize("kind", ["model", "dataset"])
def test_a_unicode_name_uploads_and_a_model_downloads_under_its_utf8_filename(service: Service, small_uploads,
                                                                              kind: str, form: str) -> None:
    client = service.client("names")
    response = _upload(client, kind, form, small_uploads[kind], UNICODE_NAME)
    assert response.status_code == 201, response.text
    row = response.json()
    assert row["name"] == UNICODE_NAME
    assert client.get(f"/v1/{kind}s/{row['id']}").json()["name"] == UNICODE_NAME
    if kind == "model":
        download = client.get(f"/v1/models/{row['id']}/download")
        assert download.status_code == 200, download.text
        assert download.content == small_uploads["model"]
        assert hashlib.sha256(download.content).hexdigest() == row["sha256"]
        assert download.headers["content-disposition"] == (
            "attachment; filename=\"download.onnx\"; filename*=UTF-8''" + quote(UNICODE_NAME + ".onnx", safe=""))


def test_a_job_name_that_breaks_headers_or_is_too_long_is_422_naming_the_field(service: Service) -> None:
    client = service.client("names")
    body = {"model_id": str(uuid.uuid4()), "method": "dynamic"}
    for name in HEADER_BREAKING_NAMES.values():
        response = client.post("/v1/jobs", json={**body, "name": name})
        assert response.status_code == 422, response.text
        assert [e["loc"] for e in response.json()["errors"]] == [["body", "name"]]
    # A Unicode name passes the name check: what is refused then is the unknown model.
    assert client.post("/v1/jobs", json={**body, "name": UNICODE_NAME}).json()["code"] == "not_found"


def test_a_name_stored_before_names_were_checked_still_downloads(service: Service, small_uploads) -> None:
    """Rows written before the name rules existed may hold anything: the download header copes on its own."""
    from sqlalchemy import create_engine, update

    from app.models import Model

    client = service.client("names")
    model = _upload(client, "model", "raw", small_uploads["model"], "placeholder").json()
    engine = create_engine(service.env["QUANTSERVE_DATABASE_URL"])
    try:
        for stored, fallback, utf8 in [
                ("a\r\nX-Injected: 1", "a_X-Injected: 1.onnx", "a__X-Injected%3A%201.onnx"),
                ('q"; filename="evil.sh', "q_ filename=_evil.sh.onnx", "q%22%3B%20filename%3D%22evil.sh.onnx"),
                (UNICODE_NAME + "\u202e", "download.onnx", quote(UNICODE_NAME + "_.onnx", safe=""))]:
            with engine.begin() as conn:
                conn.execute(update(Model).where(Model.id == uuid.UUID(model["id"])).values(name=stored))
            download = client.get(f"/v1/models/{model['id']}/download")
            assert download.status_code == 200 and download.content == small_uploads["model"]
            assert "x-injected" not in download.headers
            assert download.headers["content-disposition"] == (
                f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{utf8}")
    finally:
        engine.dispose()
