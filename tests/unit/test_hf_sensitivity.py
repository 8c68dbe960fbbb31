"""hf weight_only sensitivity (issue 14, item 1) and the perplexity goal it brings: drop = rise, higher is worse."""

from __future__ import annotations

import pytest

from worker.engine import EngineError
from worker.engine import sensitivity as s
from worker.engine.config import TargetConfig


def test_a_perplexity_goal_counts_a_rise_as_the_drop() -> None:
    goal = s.goal(TargetConfig(metric="perplexity", max_drop=0.5), None, True, float_perplexity=20.0)
    assert (goal.metric, goal.float_value, goal.from_target) == ("perplexity", 20.0, True)
    worse, better = s.Figures(0.99, 0.9, None, perplexity=20.6), s.Figures(0.99, 0.9, None, perplexity=19.0)
    assert goal.drop(worse) == pytest.approx(0.6) and not goal.met(worse)
    assert goal.drop(better) == pytest.approx(-1.0) and goal.met(better)
    assert goal.met(s.Figures(0.99, 0.9, None, perplexity=20.5))  # exactly at the limit
    assert goal.drop(s.Figures(0.99, 0.9, None)) == float("inf")  # not measured never meets a goal
    relative = s.goal(TargetConfig(metric="perplexity", max_drop=0.02, relative=True), None, True,
                      float_perplexity=20.0)
    assert relative.drop(worse) == pytest.approx(0.03) and not relative.met(worse)
    assert relative.met(s.Figures(0.99, 0.9, None, perplexity=20.4))


def test_other_metrics_and_figures_keep_their_direction_and_shape() -> None:
    figures = s.Figures(0.98, 0.75, 0.8)
    assert figures.to_dict() == {"cosine": 0.98, "accuracy": 0.8, "top1_agreement": 0.75}  # no perplexity key
    assert "perplexity" in s.Figures(0.98, 0.75, 0.8, perplexity=12.3456).to_dict()
    cosine = s.goal(TargetConfig(metric="cosine", max_drop=0.01), None, False, float_perplexity=20.0)
    assert cosine.drop(figures) == pytest.approx(0.02)
    accuracy = s.goal(TargetConfig(metric="accuracy", max_drop=0.1), 0.9, True)
    assert accuracy.drop(figures) == pytest.approx(0.1) and accuracy.met(figures)


def test_a_perplexity_target_without_a_measured_perplexity_is_a_clear_error() -> None:
    with pytest.raises(EngineError, match="causal language model") as failed:
        s.goal(TargetConfig(metric="perplexity"), None, True)
    assert failed.value.code == "dataset_mismatch"
