"""The accuracy tolerance search (compress.max_accuracy_drop, compaware/tolerance.py): the
bisection with a fake judge, the search with a fake compress-and-fine-tune (records, choice,
the dense fallback, resume), then a tiny real run and its resume."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from compaware.compress.base import AccuracySearch
from compaware.config import UserError
from compaware.tolerance import FLOOR, Attempt, bisect, search
from compaware.train import train
from tests.conftest import REPO

_SPEC = importlib.util.spec_from_file_location(
    "budget_allocation", REPO / "scripts" / "budget_allocation.py")
budget_allocation = importlib.util.module_from_spec(_SPEC)
sys.modules["budget_allocation"] = budget_allocation  # its dataclasses look their module up
_SPEC.loader.exec_module(budget_allocation)

pytestmark = pytest.mark.usefixtures("one_thread")

NODE = OmegaConf.create({"_target_": "compaware.compress.SVD", "target": "params:0.5",
                         "max_accuracy_drop": 1.0})


def test_bisection_closes_in_on_the_threshold():
    tried = bisect(lambda share: share >= 0.2, first=0.5, steps=6)
    assert tried == [0.5, 0.07071, 0.188, 0.3066, 0.2401, 0.2125]
    within = [share for share in tried if share >= 0.2]
    beyond = [share for share in tried if share < 0.2]
    assert min(within) / max(beyond) < 1.15  # the bracket around 0.2, after six candidates


def test_bisection_goes_up_when_nothing_stays_within_and_stops_when_closed():
    tried = bisect(lambda share: False, first=0.25, steps=20)
    assert tried[:3] == [0.25, 0.5, 0.7071]
    assert tried == sorted(tried) and tried[-1] > 0.999 and len(tried) < 20
    assert bisect(lambda share: True, first=0.5, steps=20)[-1] == pytest.approx(FLOOR, rel=1e-3)


def test_a_first_share_below_the_floor_is_the_strongest_tried():
    assert bisect(lambda share: True, first=0.005, steps=5) == [0.005]


class FakeRun:
    """compress_and_finetune without training: 0.8 / share points below the dense model's 100
    after fine-tuning (within a drop of 4 from share 0.2 up), the budget achieved 1.01 × the
    share; ``stop_at`` raises at that candidate, as an interrupted run would stop."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.calls: list[str] = []
        self.stop_at = stop_at

    def __call__(self, compressor, files: Path, stage: str) -> Attempt:
        self.calls.append(files.name)
        if int(files.name) == self.stop_at:
            raise KeyboardInterrupt
        share = compressor.budget.share
        accuracy = {"compressed": 90.0, "finetuned": 100 - 0.8 / share}
        report = {"budget": {"achieved": 1.01 * share, "reached": True}}
        return Attempt(compressor, nn.Linear(2, 2), report, accuracy)


def run_search(folder: Path, fake: FakeRun, max_drop: float = 4.0, resume: bool = False):
    options = AccuracySearch(max_drop, 4, "params", 0.5)
    return search(NODE, options, fake, dense=nn.Linear(3, 3), dense_accuracy=100.0,
                  folder=folder, resume=resume)


def test_search_records_every_candidate_and_keeps_the_strongest_within(tmp_path):
    fake = FakeRun()
    kept, results = run_search(tmp_path, fake)
    shares = [c["share"] for c in results["candidates"]]
    assert shares == [0.5, 0.07071, 0.188, 0.3066]
    assert [c["within"] for c in results["candidates"]] == [True, False, False, True]
    assert results["chosen"] == 4 and kept.compressor.budget.share == 0.3066
    assert kept.accuracy["finetuned"] == pytest.approx(100 - 0.8 / 0.3066)
    assert results["candidates"][3]["drop"] == pytest.approx(0.8 / 0.3066, abs=1e-6)
    assert results["candidates"][3]["achieved"] == pytest.approx(1.01 * 0.3066)
    assert "test split" in results["judged_on"]
    assert fake.calls == ["1", "2", "3", "4"]  # the kept one was not compressed again
    record = json.loads((tmp_path / "2" / "candidate.json").read_text())
    assert record == results["candidates"][1]


def test_search_without_a_candidate_within_keeps_the_dense_model(tmp_path, caplog):
    dense = nn.Linear(3, 3)
    with caplog.at_level(logging.WARNING, logger="compaware.tolerance"):
        kept, results = search(NODE, AccuracySearch(0.1, 3, "params", 0.5), FakeRun(),
                               dense=dense, dense_accuracy=100.0, folder=tmp_path,
                               resume=False)
    assert results["chosen"] is None
    assert not any(c["within"] for c in results["candidates"])
    assert kept.report == {} and kept.accuracy == {"compressed": 100.0, "finetuned": None}
    assert kept.model is not dense and torch.equal(kept.model.weight, dense.weight)
    assert "keeps the dense model" in caplog.text


def test_resume_takes_finished_candidates_from_their_records(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_search(tmp_path, FakeRun(stop_at=3))
    resumed = FakeRun()
    kept, results = run_search(tmp_path, resumed, resume=True)
    assert resumed.calls == ["3", "4"]  # 1 and 2 from their records
    _, fresh = run_search(tmp_path / "fresh", FakeRun())
    assert results == fresh and kept.compressor.budget.share == 0.3066


def test_resume_rebuilds_a_chosen_candidate_judged_before_the_interruption(tmp_path):
    _, first = run_search(tmp_path, FakeRun(), max_drop=6.0)  # within from share 0.133 up
    assert [c["share"] for c in first["candidates"]] == [0.5, 0.07071, 0.188, 0.1153]
    assert first["chosen"] == 3
    resumed = FakeRun()
    kept, results = run_search(tmp_path, resumed, max_drop=6.0, resume=True)
    assert resumed.calls == ["3"]  # only the kept model is rebuilt, from its checkpoint
    assert results == first and kept.compressor.budget.share == 0.188


def test_resume_refuses_records_of_another_search(tmp_path):
    run_search(tmp_path, FakeRun())
    with pytest.raises(UserError, match="another search"):
        search(NODE, AccuracySearch(4.0, 4, "params", 0.25), FakeRun(), dense=nn.Linear(3, 3),
               dense_accuracy=100.0, folder=tmp_path, resume=True)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["compress=prune", "compress.max_accuracy_drop=1"], "compress.target is null"),
    (["compress=svd", "compress.target=params:0.5", "compress.max_accuracy_drop=-1"],
     "compress.max_accuracy_drop=-1 is out of range"),
    (["compress=svd", "compress.target=params:0.5", "compress.max_accuracy_drop=nan"],
     "compress.max_accuracy_drop=nan"),
    (["compress=prune+svd", "compress.search_steps=0"], "compress.search_steps=0"),
    (["compress=magnitude", "+compress.max_accuracy_drop=1"], "compress=svd, prune or prune"),
])
def test_bad_options_stop_at_start(make_cfg, overrides, expected):
    with pytest.raises(UserError, match=expected.replace("+", r"\+")):
        train(make_cfg(*overrides, "bench.latency=false"))


SEARCH = ["data=digits", "regularizer=none", "compress=prune", "compress.target=params:0.5",
          "compress.max_accuracy_drop=2", "compress.search_steps=2", "bench.latency=false"]


def test_a_run_searches_and_resumes_exactly(make_cfg, tmp_path):
    results = train(make_cfg(*SEARCH))
    found = results["search"]
    folder = tmp_path / "run" / "checkpoints" / "search"
    assert [c["number"] for c in found["candidates"]] == [1, 2]
    assert found["candidates"][0]["share"] == 0.5
    assert all(c["achieved"] is not None for c in found["candidates"])
    assert found["dense_accuracy"] == results["accuracy"]["dense"]
    chosen = found["chosen"]
    if chosen is None:
        assert results["params"]["compressed"] == results["params"]["dense"]
    else:
        entry = found["candidates"][chosen - 1]
        assert entry["within"]
        assert results["accuracy"]["finetuned"] == entry["accuracy"]["finetuned"]
        assert results["compression"]["details"]["budget"]["achieved"] == entry["achieved"]
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["search"] == found

    # An interruption after the first candidate: the second's files are gone.
    first = (folder / "1" / "finetune.pt").stat().st_mtime_ns
    for name in ("finetune.pt", "candidate.json"):
        (folder / "2" / name).unlink()
    again = train(make_cfg(*SEARCH, "resume=true"))
    assert (folder / "1" / "finetune.pt").stat().st_mtime_ns == first  # not fine-tuned again
    assert again["search"] == found and again["accuracy"] == results["accuracy"]


def test_the_uniform_setting_is_the_weakest_that_meets_the_budget():
    """scripts/budget_allocation.py: the per-layer value, from either direction."""
    ratio = budget_allocation.weakest(lambda r: 1 - r, weak=0.0, strong=0.99, goal=0.3)
    assert 1 - ratio <= 0.3 and ratio == pytest.approx(0.7, abs=1e-5)
    energy = budget_allocation.weakest(lambda e: e, weak=1.0, strong=1e-6, goal=0.25)
    assert energy <= 0.25 and energy == pytest.approx(0.25, abs=1e-5)
    steps = budget_allocation.weakest(lambda r: 1.0 if r < 0.5 else 0.2, 0.0, 0.99, 0.25)
    assert steps == pytest.approx(0.5, abs=1e-5)  # a step function: its edge
