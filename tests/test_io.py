"""mflag.io: atomic writes, strict JSON with rounded floats, and the DVCLive logger the stages open (only its
curve files, no time stamps)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mflag.io import SIGNIFICANT_DIGITS, atomic_write, open_live, write_json


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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), np.float64("nan")])
def test_write_json_refuses_nan_and_infinity_naming_the_key(tmp_path, bad):
    """A metrics file is strict JSON: json.dumps would write a bare NaN token, which JSON does not have."""
    obj = {"auc": 0.5, "per_seed": [{"auc": 0.5}, {"auc": bad}], "map_per_iou": [0.1, bad]}
    with pytest.raises(ValueError, match=r"m\.json: NaN or infinite .*per_seed\[1\]\.auc, map_per_iou\[1\]"):
        write_json(tmp_path / "m.json", obj)
    assert not (tmp_path / "m.json").exists()
    write_json(tmp_path / "m.json", {"auc": None, "not_evaluable": "one class"})  # undefined: null with its reason
    assert json.loads((tmp_path / "m.json").read_text()) == {"auc": None, "not_evaluable": "one class"}


def test_write_json_rounds_floats_so_last_bit_differences_write_the_same_bytes(tmp_path):
    assert SIGNIFICANT_DIGITS == 10
    a = 0.7382560340062216
    b = a * (1 + 3e-15)  # another summation order: the 15th significant digit moves
    assert a != b
    for name, x in (("a", a), ("b", b)):
        write_json(tmp_path / f"{name}.json", {"auc": x, "per_seed": [{"auc": x / 3}], "n_train": 123456789012,
                                               "map_per_iou": [x * 1e-7, x * 1e7], "best": True, "note": "text"})  # fmt: skip
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    got = json.loads((tmp_path / "a.json").read_text())
    assert got["auc"] == 0.738256034 and got["per_seed"][0]["auc"] == float(f"{a / 3:.10g}")
    assert got["map_per_iou"] == [float(f"{a * 1e-7:.10g}"), float(f"{a * 1e7:.10g}")]
    assert got["n_train"] == 123456789012 and got["best"] is True  # integers and booleans untouched


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
