"""The Python client without a server: it imports no server code, shares the API's models, and retries only
what is safe to repeat (real sockets, a real closed port; only the sleep between attempts is recorded)."""

from __future__ import annotations

import ast
import re
import socket
import subprocess
import sys
import threading
import tomllib
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from app import schemas as server_schemas
from quantserve_client import schemas as client_schemas
from quantserve_client.http import Transport, retry_after_s
from quantserve_client.transfer import safe_filename
from tests.conftest import ROOT, free_port

SERVER_MODULES = ("app", "worker", "fastapi", "sqlalchemy", "celery", "starlette", "torch", "numpy", "onnxruntime")


def test_the_client_and_its_cli_import_no_server_code() -> None:
    code = ("import sys, quantserve_client, quantserve_client.cli, quantserve_client.client\n"
            "quantserve_client.cli.build_parser()\n"
            f"print(','.join(m for m in {SERVER_MODULES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_importing_the_shared_models_does_not_import_the_http_client() -> None:
    # The API image has no httpx: app/schemas.py imports quantserve_client.schemas, which must stay light.
    code = "import sys, quantserve_client.schemas; print('httpx' in sys.modules, 'rich' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_the_server_answers_with_the_very_models_the_client_parses() -> None:
    for name in ("JobPublic", "ModelPublic", "DatasetPublic", "ArtifactPublic", "LogLine", "Capabilities", "Page"):
        assert getattr(server_schemas, name) is getattr(client_schemas, name), name


def test_an_older_client_reads_a_newer_servers_answer_with_added_fields() -> None:
    log = client_schemas.LogLine.model_validate({"seq": 1, "ts": "2026-11-29T12:00:00Z", "level": "info",
                                                 "message": "m", "added_later": {"x": 1}})
    assert log.message == "m"


def test_retry_after_reads_seconds_and_http_dates_and_ignores_garbage() -> None:
    now = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
    assert retry_after_s("7") == 7.0
    assert retry_after_s("Sun, 29 Nov 2026 12:00:30 GMT", now) == 30.0
    assert retry_after_s((now - timedelta(minutes=1)).strftime("%a, %d %b %Y %H:%M:%S GMT"), now) == 0.0
    assert retry_after_s("soon") is None and retry_after_s(None) is None


@pytest.mark.parametrize("name, safe", [("mlp.int8.onnx", "mlp.int8.onnx"), ("../../etc/passwd", "passwd"),
                                        ("..\\..\\boot.ini", "boot.ini"), (".bashrc", "bashrc"), ("", "artifact"),
                                        ("a\nb.onnx", "ab.onnx"), ("модель.onnx", "модель.onnx")])
def test_an_artifact_name_never_leads_out_of_the_chosen_folder(name: str, safe: str) -> None:
    assert safe_filename(name) == safe


def _transport(url: str, retries: int = 3) -> tuple[Transport, list[float]]:
    slept: list[float] = []
    return Transport(url, "qs_x", timeout_s=5, retries=retries, backoff_s=0.5, max_backoff_s=4,
                     sleep=slept.append), slept


def test_connection_refused_is_retried_with_growing_capped_backoff_then_raised() -> None:
    transport, slept = _transport(f"http://127.0.0.1:{free_port()}", retries=5)  # nothing listens there
    with pytest.raises(httpx.ConnectError):
        transport.request("PUT", "/v1/models/upload", idempotent=False, content=lambda: b"x")
    assert len(slept) == 5
    assert all(0.25 <= d <= 4 for d in slept) and slept[-1] > slept[0], slept


class HangUpServer:
    """Accepts connections, reads the request, and closes without answering: the answer is lost in transit."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port, self.connections = self.sock.getsockname()[1], 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.recv(65536)
            conn.close()


def test_a_lost_answer_is_retried_for_a_read_but_never_for_an_upload() -> None:
    server = HangUpServer()
    try:
        transport, slept = _transport(f"http://127.0.0.1:{server.port}", retries=2)
        with pytest.raises(httpx.RemoteProtocolError):
            transport.request("GET", "/v1/jobs/x", idempotent=True)
        assert server.connections == 3 and len(slept) == 2
        # The upload may have been stored before the answer was lost: sending it again could make a second model.
        with pytest.raises(httpx.RemoteProtocolError):
            transport.request("PUT", "/v1/models/upload", idempotent=False, content=lambda: b"x" * 10)
        assert server.connections == 4 and len(slept) == 2
    finally:
        server.sock.close()


def test_the_client_package_needs_only_the_standard_library_httpx_pydantic_and_rich() -> None:
    # What client/pyproject.toml declares is all it may import: a clean venv with those three must be enough.
    declared = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]["dependencies"]
    allowed = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0] for d in declared}
    assert allowed == {"httpx", "pydantic", "rich"}
    imported = set()
    for path in (ROOT / "client" / "quantserve_client").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    outside = imported - set(sys.stdlib_module_names) - allowed - {"quantserve_client"}
    assert not outside, f"quantserve_client imports {sorted(outside)}, which client/pyproject.toml does not install"


@pytest.mark.slow
def test_the_client_installs_and_runs_in_a_clean_venv(tmp_path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT / "client")], check=True, timeout=600)
    installed = subprocess.run([str(venv / "bin" / "pip"), "list", "--format=freeze"], capture_output=True,
                               text=True, check=True).stdout.lower()
    assert not {"torch", "fastapi", "sqlalchemy", "celery"} & {line.split("==")[0] for line in installed.split()}
    usage = subprocess.run([str(venv / "bin" / "quantserve"), "--help"], capture_output=True, text=True, check=True)
    assert "{submit,download,jobs}" in usage.stdout


def test_the_servers_quantserve_lists_the_client_commands_and_hands_them_over(capsys) -> None:
    from app import cli

    assert {"submit", "download", "jobs"} <= set(cli.build_parser().format_help().split("{", 1)[1].split("}")[0]
                                                 .split(","))
    with pytest.raises(SystemExit) as done:
        cli.main(["submit", "--help"])
    assert done.value.code == 0
    assert "--calibration DATASET" in capsys.readouterr().out  # the client's own parser answered
