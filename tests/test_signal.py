"""scripts/signal_probe.py's own logic: labels from truth rows, the position between random and the bound, the
probe AUC table (against hand-written cases)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sig():
    spec = importlib.util.spec_from_file_location("signal_probe", ROOT / "scripts/signal_probe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _f(kind: str, hedged: bool = False) -> list:
    return [kind, "right", "lower", "small", hedged, ""]


LABELS = ("atelectasis", "cardiomegaly", "consolidation", "edema", "effusion", "covid", "normal")


@pytest.mark.parametrize(
    "findings, positive",
    [
        ([], {"normal"}),  # nothing drawn: COVIDx normal, nothing else
        ([_f("effusion", hedged=True), _f("covid")], {"effusion", "covid"}),  # hedged still present
        ([_f("pneumothorax"), _f("foreign_object")], set()),  # a pneumothorax is not COVIDx-normal
        ([_f("device"), _f("nodule"), _f("cardiomegaly")], {"cardiomegaly", "normal"}),
        ([_f("consolidation"), _f("atelectasis"), _f("edema")], {"consolidation", "atelectasis", "edema"}),
    ],
)
def test_truth_targets(sig, findings, positive):
    assert tuple(sig.TARGETS) == LABELS
    assert sig.truth_targets(findings) == {k: int(k in positive) for k in LABELS}


def test_truth_targets_refuses_unknown_kinds(sig):
    with pytest.raises(ValueError, match="pneumonia"):
        sig.truth_targets([_f("pneumonia")])


def test_kind_targets(sig):
    got = sig.kind_targets([_f("covid"), _f("device")], ("consolidation", "covid", "device", "nodule"))
    assert got.tolist() == [0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "mflag, random, bound, expected",
    [
        (0.7, 0.6, 0.8, 0.5),
        (0.55, 0.6, 0.8, -0.25),  # below random
        (0.9, 0.6, 0.8, 1.5),  # beyond the bound
        (0.7, 0.6, 0.6, None),  # bound equal to random: undefined
        (0.7, 0.6, 0.5, None),  # bound below random: undefined
    ],
)
def test_position(sig, mflag, random, bound, expected):
    got = sig.position(mflag, random, bound)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_auc_table(sig):
    # positives 0.35, 0.8 against negatives 0.1, 0.4: 3 of 4 pairs ordered -> 0.75
    scores = np.array([[0.1, 1.0], [0.4, 1.0], [0.35, 1.0], [0.8, 1.0]])
    y = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    idx = np.tile(np.arange(4), (50, 1))  # every resample is the whole set: a zero-width interval
    rows = sig.auc_table(scores, y, idx, 0.95)
    assert rows[0] == pytest.approx((0.75, 0.75, 0.75))
    assert rows[1] == pytest.approx((0.5, 0.5, 0.5))  # all tied: one half
    one_class = sig.auc_table(scores[:, :1], np.zeros((4, 1), int), idx, 0.95)
    assert one_class == [(None, None, None)]
