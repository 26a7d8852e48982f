"""mflag.live.StepLog writes the files DVCLive writes (DVCLive itself is the reference); mflag.io.atomic_write."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mflag.io import atomic_write
from mflag.live import StepLog


def _files(root) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, fs in os.walk(root)
        for f in fs
    }


def _run(live, explicit_steps: bool) -> None:
    """A run as the stages log one: per-epoch metrics, one appearing late, NaN, ints and numpy scalars."""
    for epoch in range(4):
        if explicit_steps:
            live.step = 5 * (epoch + 1)
        live.log_metric("train/loss", 1.0 / (epoch + 1))
        live.log_metric("train/lr", np.float64(1e-3 * 0.5**epoch))
        live.log_metric("valid_dice", float("nan") if epoch == 1 else 0.1 * epoch)
        if epoch >= 2:
            live.log_metric("best_epoch", epoch)
        live.next_step()
    live.end()


@pytest.mark.parametrize("explicit_steps", [False, True])
def test_steplog_writes_what_dvclive_writes(tmp_path, monkeypatch, explicit_steps):
    from dvclive import Live

    monkeypatch.chdir(tmp_path)  # outside any Git or DVC repository
    for folder in ("ours", "dvclive"):  # a stale file of an earlier run, which both must clear
        (tmp_path / folder / "plots" / "metrics").mkdir(parents=True)
        (tmp_path / folder / "plots" / "metrics" / "old.tsv").write_text("step\told\n0\t1\n")
        (tmp_path / folder / "metrics.json").write_text("{}\n")
    _run(StepLog(tmp_path / "ours"), explicit_steps)
    _run(Live(str(tmp_path / "dvclive"), dvcyaml=False, save_dvc_exp=False), explicit_steps)
    ours, ref = _files(tmp_path / "ours"), _files(tmp_path / "dvclive")
    assert sorted(ours) == sorted(ref)
    assert "old.tsv" not in str(sorted(ours))
    for name in ref:
        assert ours[name] == ref[name], name


def test_steplog_refuses_non_numbers(tmp_path):
    live = StepLog(tmp_path)
    for bad in ("0.5", None, True):
        with pytest.raises(TypeError, match="train/loss"):
            live.log_metric("train/loss", bad)


def test_atomic_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write(target, "first version, longer\n")
    atomic_write(target, b"second\n")
    assert target.read_bytes() == b"second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]
