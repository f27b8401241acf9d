"""Nothing trusted blindly: numbers that are not numbers, sizes and times no machine holds,
and a run that trained on nothing are all refused, at start where they can be."""

from __future__ import annotations

from pathlib import Path

import pytest

from compaware.config import UserError
from compaware.train import train
from tests.test_faults import _poisoned, reference  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("override", "option"), [
    ("regularizer.lam=nan", "regularizer.lam"),
    ("compress.energy=nan", "compress.energy"),
    ("schedule.lr=nan", "schedule.lr"),
    ("schedule.lr=inf", "schedule.lr"),
    ("schedule.momentum=nan", "schedule.momentum"),
    ("regularizer.lam=-inf", "regularizer.lam"),
    ("seed=18446744073709551616", "seed"),
    ("schedule.epochs=1000000000000", "schedule.epochs"),
])
def test_a_number_that_is_not_finite_or_fits_nothing_is_refused_at_start(make_cfg, override,
                                                                          option):
    cfg = make_cfg(override)
    with pytest.raises(UserError, match=option.replace(".", r"\.")):
        train(cfg)
    assert not (Path(cfg.paths.run_dir) / "checkpoints").exists()


def test_a_run_that_skipped_every_batch_is_not_completed(reference, tmp_path):  # noqa: F811
    _, make = reference
    with pytest.raises(UserError, match="every batch of the epoch was skipped"):
        train(_poisoned(make, tmp_path, 1, 10**6, "schedule.on_nan=skip_batch"))
    assert not (tmp_path / "results.json").exists()
