"""The registry is the single list of what quantserve can do: every entry must import and round-trip."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.routes.system import capabilities_document
from worker.engine.config import DynamicConfig, WeightOnlyConfig
from worker.engine.errors import UnsupportedMethodError
from worker.engine.registry import SPECS, resolve


@pytest.mark.parametrize("key", list(SPECS), ids=lambda k: f"{k[0]}-{k[1]}")
def test_each_spec_imports_its_handler_and_round_trips_its_config(key) -> None:
    spec = SPECS[key]
    assert callable(spec.load_handler())
    config = spec.config_model()
    assert spec.config_model.model_validate(config.model_dump(mode="json")) == config


def test_unknown_pair_lists_what_is_supported() -> None:
    with pytest.raises(UnsupportedMethodError) as info:
        resolve("onnx", "alchemy")
    assert "onnx/dynamic" in str(info.value) and "onnx/dynamic" in info.value.supported


def test_configs_refuse_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValidationError):
        DynamicConfig.model_validate({"granularity": "per_row"})
    with pytest.raises(ValidationError):
        DynamicConfig.model_validate({"surprise": True})
    with pytest.raises(ValidationError, match="regular expression"):
        DynamicConfig.model_validate({"exclude": ["[unclosed"]})
    with pytest.raises(ValidationError):
        WeightOnlyConfig.model_validate({"group_size": 48})


def test_capabilities_are_generated_from_the_registry() -> None:
    doc = capabilities_document()
    listed = {(fmt, method) for fmt, entry in doc["formats"].items() for method in entry["methods"]}
    assert listed == {(f.value, m.value) for f, m in SPECS}
    assert doc["formats"]["onnx"]["methods"]["dynamic"]["options"]["additionalProperties"] is False
    assert "cpu" in doc["devices"] and "cpu" in doc["queues"]
