"""Checkpoints: atomic writes, and refusal of files that are corrupt or would run code."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from compaware import checkpoint
from compaware.config import UserError


def test_roundtrip_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"epoch": 3, "w": torch.ones(2)}, path)
    checkpoint.save({"epoch": 4, "w": torch.zeros(2)}, path)
    assert checkpoint.load(path)["epoch"] == 4
    assert os.listdir(tmp_path) == ["c.pt"]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"epoch": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        checkpoint.save({"epoch": 2, "bad": lambda: 0}, path)
    assert checkpoint.load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _RunsCode()}, path)
    with pytest.raises(UserError, match="weights_only"):
        checkpoint.load(path)


def test_truncated_checkpoint_gives_a_clear_message(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="truncated, corrupted"):
        checkpoint.load(path)


def test_init_from_with_the_wrong_model_names_the_option(tmp_path):
    checkpoint.save({"model": {"weight": torch.ones(2, 2)}}, tmp_path / "c.pt")
    with pytest.raises(UserError, match="init_from"):
        checkpoint.load_weights(torch.nn.Linear(3, 3), tmp_path / "c.pt")
