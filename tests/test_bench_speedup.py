"""scripts/bench_speedup.py: the run's inference forms (compaware/deploy/forms.py), each model
in the fastest of the forms it can be built in, and the form its latency-aware rows time
their layers in."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from compaware.config import UserError

_SPEC = importlib.util.spec_from_file_location(
    "bench_speedup", Path(__file__).resolve().parents[1] / "scripts" / "bench_speedup.py")
bench_speedup = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_speedup)


def test_the_latency_aware_rows_time_in_the_form_benchmarked_or_eagerly():
    assert [bench_speedup.layer_form(form) for form in
            ("eager", "channels_last", "strided_pools", "onnxruntime", "inductor",
             "fastest")] == [
        "eager", "channels_last", "eager", "onnxruntime", "inductor", "eager"]


def test_the_forms_are_the_runs_forms():
    assert set(bench_speedup.FORMS) == {"eager", "channels_last", "strided_pools", "inductor",
                                        "onnxruntime"}


def test_a_choosing_form_runs_the_model_in_one_of_its_forms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2)).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.inference_mode():
        for among in (("eager", "channels_last"), ("strided_pools",)):
            forward = bench_speedup.inference_form(model, "fastest", x, among)
            torch.testing.assert_close(forward(x), model(x))


def test_forms_that_cannot_be_built_are_left_out_and_none_left_is_a_clear_error():
    pytest.importorskip("onnxruntime")
    pooled_up = nn.Sequential(nn.Conv2d(1, 2, 1), nn.AdaptiveAvgPool2d(6)).eval()  # 3×3 → 6×6
    x = torch.randn(1, 1, 3, 3)
    built = bench_speedup.available_forms(pooled_up, ("eager", "onnxruntime"), x)
    assert list(built) == ["eager"]
    with pytest.raises(UserError, match="none of the forms onnxruntime could be built"):
        bench_speedup.available_forms(pooled_up, ("onnxruntime",), x)
