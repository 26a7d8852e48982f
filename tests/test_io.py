"""mflag.io: atomic writes, and the DVCLive logger the stages open (only its curve files, no time stamps)."""

from __future__ import annotations

import json
import os

import numpy as np

from mflag.io import atomic_write, open_live, write_json


def _files(root) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, fs in os.walk(root)
        for f in fs
    }


def test_atomic_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write(target, "first version, longer\n")
    atomic_write(target, b"second\n")
    assert target.read_bytes() == b"second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_write_json_keeps_key_order_and_ends_with_a_newline(tmp_path):
    write_json(tmp_path / "m.json", {"b": 1, "a": [0.5, None]})
    text = (tmp_path / "m.json").read_text()
    assert text.endswith("}\n") and list(json.loads(text)) == ["b", "a"]


def _log_run(folder) -> None:
    """A run as stages/pretrain.py logs one: explicit steps, float and numpy values, a NaN."""
    live = open_live(folder)
    for step in range(1, 5):
        live.step = 3 * step
        live.log_metric("train/total", 1.0 / step)
        live.log_metric("train/lr", np.float64(1e-3 * 0.5**step))
        live.log_metric("valid_dice", float("nan") if step == 2 else 0.1 * step)
        live.next_step()
    live.end()


def test_open_live_writes_only_the_curve_files_and_the_same_bytes_every_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside any Git or DVC repository
    runs = []
    for name in ("a", "b"):
        folder = tmp_path / name
        (folder / "plots" / "metrics").mkdir(parents=True)  # an earlier run's files, which must go
        (folder / "plots" / "metrics" / "old.tsv").write_text("step\told\n0\t1\n")
        (folder / "metrics.json").write_text('{"old": 1}\n')
        _log_run(folder)
        runs.append(_files(folder))
    a, b = runs
    assert sorted(a) == ["metrics.json", "plots/metrics/train/lr.tsv", "plots/metrics/train/total.tsv",
                         "plots/metrics/valid_dice.tsv"]  # no dvc.yaml, no report, no stale curve
    assert a == b  # no time stamps: identical runs give identical bytes (their DVC hashes)
    assert a["plots/metrics/train/total.tsv"].decode() == "step\ttotal\n3\t1.0\n6\t0.5\n9\t0.3333333333333333\n12\t0.25\n"
    assert a["plots/metrics/valid_dice.tsv"].decode().splitlines()[2] == "6\tnan"
    summary = json.loads(a["metrics.json"])
    assert summary == {"train": {"total": 0.25, "lr": 1e-3 * 0.5**4}, "valid_dice": 0.4, "step": 12}
    assert not (tmp_path / "dvclive").exists() and not (tmp_path / "dvc.yaml").exists()
