"""Nothing trusted blindly: numbers that are not numbers, sizes and times no machine holds,
and a run that trained on nothing are all refused, at start where they can be."""

from __future__ import annotations

import errno
import hashlib
import json
import random
import struct
from pathlib import Path

import pytest
import torch

from compaware import checkpoint
from compaware.compress import KMeans, storage
from compaware.config import UserError
from compaware.report import main as report_main
from compaware.train import train
from tests.conftest import run_cli
from tests.test_faults import _poisoned, reference  # noqa: F401 (a fixture)
from tests.test_report import _fake_run

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


DAMAGED = {"garbage": b"\x89\xff\x00binary", "a list": b"[1, 2, 3]", "null": b"null",
           "wrong type": json.dumps({"status": "completed",
                                     "accuracy": {"dense": "high", "finetuned": "98"},
                                     "params": {"dense": 10, "compressed": 5}}).encode(),
           "half written": b'{"status": "compl'}


def test_the_report_lists_damaged_runs_with_the_reason_and_reports_the_rest(tmp_path):
    _fake_run(tmp_path, "good", "lowrank", "svd", 97.0, 100)
    for name, content in DAMAGED.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_bytes(content)
    (tmp_path / "good" / ".hydra" / "overrides.yaml").write_text("- [unclosed")
    assert report_main([str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "results.md").read_text()
    assert "lowrank → svd" in md  # the readable run is reported …
    for name in DAMAGED:  # … and each damaged one is listed, with why
        row = next(line for line in md.splitlines() if f"{tmp_path / name} |" in line)
        assert "| unreadable |" in row and "results.json:" in row


def test_a_sweep_with_invalid_values_names_each_and_runs_nothing(tmp_path):
    out = run_cli("train", "-m", "debug=fast", "schedule.epochs=1,abc,1",
                  "model=lenet300,resnet5", "regularizer.lam=0.1,-1",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "none of its jobs ran" in out.stderr
    for value in ("schedule.epochs=abc", "model=resnet5", "regularizer.lam=-1"):
        assert f"  {value}: " in out.stderr
    assert "lenet300" not in out.stderr.split("model=resnet5")[0]  # valid values not named
    assert not (tmp_path / "sweep").exists()


def test_a_flipped_bit_in_a_checkpoint_is_named_not_loaded(tmp_path):
    path = tmp_path / "train.pt"
    weight = torch.full((1000,), -0.0187)
    checkpoint.save({"epoch": 2, "model": {"fc.weight": weight}}, path)
    assert torch.equal(checkpoint.load(path)["model"]["fc.weight"], weight)
    data = bytearray(path.read_bytes())
    at = bytes(data).index(struct.pack("<f", -0.0187)) + 3
    data[at] ^= 0x04  # an exponent bit: -0.0187 becomes another number, the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"checkpoint {path} is damaged"):
        checkpoint.load(path)


def test_a_checkpoint_without_its_checksum_is_refused_for_resume_but_not_for_init_from(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"model": torch.nn.Linear(3, 2).state_dict(), "epoch": 1}, path)
    with pytest.raises(UserError, match="carries no checksum"):
        checkpoint.load(path)
    checkpoint.load_weights(torch.nn.Linear(3, 2), path)  # a file from elsewhere: no checksum


def _cwsf(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    compressor = KMeans(linear_bits=3)
    compressed, _ = compressor(torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.ReLU(),
                                                   torch.nn.Linear(20, 4)))
    compressor.save(compressed, tmp_path)
    return tmp_path / "model_compressed.cwsf", compressed


def test_every_damaged_cwsf_file_is_named_never_loaded(tmp_path):
    path, _ = _cwsf(tmp_path)
    good = path.read_bytes()
    rng = random.Random(0)
    damaged = [good[:cut] for cut in (5, 10, len(good) // 2, len(good) - 1)]
    for at in rng.sample(range(4, len(good)), 150):  # a flipped bit anywhere past the magic
        flipped = bytearray(good)
        flipped[at] ^= 1 << rng.randrange(8)
        damaged.append(bytes(flipped))
    for data in damaged:
        path.write_bytes(data)
        with pytest.raises(storage.DamagedFile, match=str(path)):
            storage.read_state_dict(path)


def _sealed(body: bytes) -> bytes:
    """``body`` with a valid checksum: a crafted file, not a damaged one."""
    return body + hashlib.sha256(body).digest()


def test_a_crafted_cwsf_file_is_checked_before_anything_is_allocated(tmp_path):
    path = tmp_path / "crafted.cwsf"
    header = storage.MAGIC + struct.pack("<BBI", storage.VERSION, 0, 1)
    huge = header + b"\x01w" + struct.pack("<BB2I", storage.SPARSE, 2, 100_000, 100_000)
    path.write_bytes(_sealed(huge + struct.pack("<BBBIIB", 8, 4, 0, 16, 1000, 11)))
    with pytest.raises(storage.DamagedFile, match="more than this machine's memory"):
        storage.read_state_dict(path)
    rows = header + b"\x01w" + struct.pack("<BB2I", storage.SPARSE, 2, 2**28, 1)
    path.write_bytes(_sealed(rows + struct.pack("<BBBIIB", 8, 4, 0, 16, 2**31, 32)))
    with pytest.raises(storage.DamagedFile):
        storage.read_state_dict(path)
    code = header + b"\x01w" + struct.pack("<BBI", storage.RAW, 1, 4) + b"\x04load"
    path.write_bytes(_sealed(code + struct.pack("<I", 16) + bytes(16)))
    with pytest.raises(storage.DamagedFile, match="dtype 'load'"):
        storage.read_state_dict(path)


def test_the_cwsf_file_is_written_atomically(tmp_path, monkeypatch):
    path, compressed = _cwsf(tmp_path)
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("compaware.checkpoint.os.fsync", full_disk)
    with pytest.raises(UserError, match="cannot write .*model_compressed.cwsf.*disk full"):
        KMeans(linear_bits=2).save(compressed, tmp_path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "model_compressed.cwsf"]
