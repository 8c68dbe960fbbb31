"""The API process must stay free of the ML stack: importing it may not load torch or onnxruntime."""

import os
import subprocess
import sys


def test_importing_the_api_does_not_import_ml_libraries() -> None:
    code = ("import sys, app.main, app.cli; app.main.create_app(); "
            "print(','.join(m for m in ('torch', 'torchao', 'onnxruntime', 'onnx', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_api_builds_exactly_one_celery_app_and_only_in_its_lifespan(tmp_path) -> None:
    # The API only publishes; the worker's own app (task modules, worker settings) must not ride along.
    code = ("import asyncio, celery._state as state, app.main\n"
            "api = app.main.create_app()\n"
            "print(len(state._apps))\n"
            "async def serve():\n"
            "    async with api.router.lifespan_context(api):\n"
            "        print(len(state._apps), api.state.publisher.celery_app in state._apps)\n"
            "asyncio.run(serve())\n")
    env = {**os.environ, "QUANTSERVE_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["0", "1", "True"], out.stdout + out.stderr
