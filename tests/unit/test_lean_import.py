"""The API process must stay free of the ML stack: importing it may not load torch or onnxruntime."""

import subprocess
import sys


def test_importing_the_api_does_not_import_ml_libraries() -> None:
    code = ("import sys, app.main, app.cli; app.main.create_app(); "
            "print(','.join(m for m in ('torch', 'torchao', 'onnxruntime', 'onnx', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
