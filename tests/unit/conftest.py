"""Fixtures shared by the engine's unit tests; a test module's own fixture of the same name wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import models


@pytest.fixture(scope="module")
def workdir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def data(workdir: Path) -> dict[str, Path]:
    """Digits as datasets: 256 calibration samples, and the held-out split with labels for evaluation."""
    x_train, _, x_test, y_test = models.digits_data()
    return {"calibration": models.save_npz(workdir / "cal.npz", x=x_train[:256]),
            "evaluation": models.save_npz(workdir / "eval.npz", x=x_test, labels=y_test)}
