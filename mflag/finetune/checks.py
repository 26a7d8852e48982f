"""What a fine-tuning cell does with a subset that holds a single class, and the record it writes.

A train, valid or test subset without both classes (classification: one class in the binary or multiclass
label, or in every column of a multi-label job; segmentation: no positive mask; detection: no box) either
stops the cell (:class:`SubsetError`: a train subset without any positive), lets it run with a warning, or
makes its test metric not evaluable: written as null with the reason in ``not_evaluable`` (docs/contracts.md,
"Metrics"). :func:`cell_record`
turns an evaluator's result into strict JSON: no NaN or infinity is ever written, and no bootstrap evidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mflag.data import LABEL_COLUMNS
from mflag.finetune.data import COVIDX_CLASSES, TaskData

SUBSETS = ("train", "valid", "test")


class SubsetError(ValueError):
    """A subset the cell cannot be run on; the message names the subset and the data fraction."""


@dataclass(frozen=True)
class SubsetCheck:
    not_evaluable: str | None = None  # why the test metric is undefined, or None
    warnings: list[str] = field(default_factory=list)


def _rows_of(data: TaskData, subset: str) -> np.ndarray:
    return np.asarray(getattr(data, f"{subset}_rows"), dtype=np.int64).reshape(-1)


def _label_names(data: TaskData, width: int) -> list[str]:
    names = LABEL_COLUMNS.get(data.dataset, ())
    return list(names) if len(names) == width else (["label"] if width == 1 else [f"label {k}" for k in range(width)])


def _single_class(data: TaskData, task: str, rows: np.ndarray) -> str | None:
    """How the labels of `rows` hold a single class ("has no box", ...), or None where they hold both."""
    if len(rows) == 0:
        return None  # empty subsets are the stage's own check
    if task == "seg":
        # short-circuits at the first positive, so a usable subset costs a few reads of the memory map
        return None if any(bool(np.asarray(data.masks[r]).any()) for r in rows) else "has no positive mask"
    if task == "det":
        return None if any(len(data.boxes.get(int(r), ())) for r in rows) else "has no box"
    y = np.asarray(data.labels)[rows]
    if data.kind == "multilabel":
        values = [np.unique(y[:, k]) for k in range(y.shape[1])]
        if any(len(v) > 1 for v in values):
            return None  # a label with one class here is skipped from the macro AUC (mflag.finetune.classify)
        names = _label_names(data, y.shape[1])
        return "has a single class in every label (" + ", ".join(f"{n} {v[0]:g}" for n, v in zip(names, values)) + ")"
    values = np.unique(y.reshape(-1))
    if len(values) > 1:
        return None
    (name,) = _label_names(data, 1)
    covidx = data.kind == "multiclass" and data.dataset == "covidx"
    value = COVIDX_CLASSES[int(values[0])] if covidx else f"{values[0]:g}"
    return f"has a single class (every {name} is {value})"


def single_class_subsets(data: TaskData, task: str) -> dict[str, str]:
    """{subset: how it holds a single class} for the subsets of `data` without both classes."""
    found = {s: _single_class(data, task, _rows_of(data, s)) for s in SUBSETS}
    return {s: how for s, how in found.items() if how is not None}


def _no_positive(data: TaskData, task: str, rows: np.ndarray) -> bool:
    """Whether `rows` hold no positive at all: no mask or box; every binary or multi-label label 0. A multiclass
    label has no positive class, so never."""
    if task in ("seg", "det"):
        return _single_class(data, task, rows) is not None
    return data.kind != "multiclass" and not np.asarray(data.labels)[rows].any()


def check_subsets(data: TaskData, task: str, pct: int) -> SubsetCheck:
    """Decide what one cell (task ``cls``, ``seg`` or ``det``, data fraction ``pct``) does with its subsets.

    Raises :class:`SubsetError` where the cell cannot be run; returns the reason its test metric is not
    evaluable (or None) and the warnings to print. The cases and their reasons are in docs/contracts.md,
    "Metrics".
    """
    found = single_class_subsets(data, task)
    n = {s: len(_rows_of(data, s)) for s in SUBSETS}

    def what(subset: str) -> str:
        at = f" at {pct}%" if subset == "train" else ""
        return f"the {subset} subset{at} ({n[subset]} rows) {found[subset]}"

    warnings, not_evaluable = [], None
    if "train" in found:
        # No positive at all: nothing can be learned, and since the split gives every fraction a positive of
        # each label that has one in train (docs/contracts.md), the whole train split has none: a data error.
        if _no_positive(data, task, _rows_of(data, "train")):
            raise SubsetError(f"{what('train')}: nothing can be learned from it; see data/splits/{data.dataset}.csv "
                              "and the dataset's labels")  # fmt: skip
        # Positives only (or one class of several): what a small fraction of a small corpus gives; it runs.
        warnings.append(f"{what('train')}: the head sees no other class, so its test metric says little")
    if "valid" in found:
        if task == "det":  # mflag.finetune.detect keeps the first epoch when no validation mAP is defined
            warnings.append(f"{what('valid')}: no validation mAP picks the epoch; the first epoch's head is tested")
        else:  # cls, seg: the validation loss that picks the epoch is still defined, on that one class
            warnings.append(f"{what('valid')}: the epoch is picked on the validation loss of that class alone")
    if "test" in found:
        if task == "seg":  # Dice is defined: an empty truth scores 1 for an empty prediction, else 0
            warnings.append(f"{what('test')}: Dice only scores whether the predictions are empty")
        elif task == "cls" and data.kind == "multiclass":  # accuracy is defined: that class's recall
            warnings.append(f"{what('test')}: the accuracy is that class's recall (no AUC)")
        else:  # AUC needs both classes, mAP a truth box: the metric is null, with this reason
            metric = "AUC needs both classes" if task == "cls" else "mAP needs a truth box"
            not_evaluable = f"{what('test')}: {metric}"
    return SubsetCheck(not_evaluable, warnings)


def trivial_score(data: TaskData, task: str) -> float:
    """The test metric of a model that learned nothing, on the same test cases: the floor a cell must clear.

    Classification: a constant score, AUC 0.5; accuracy (multiclass): every test image given the training
    subset's most frequent class (the lowest class id on a tie). Segmentation: empty masks everywhere, i.e.
    the share of test images without a mask (an empty truth scores 1 for an empty prediction). Detection: no
    box, mAP 0."""
    test = _rows_of(data, "test")
    if task == "seg":
        return float(np.mean([not np.asarray(data.masks[r]).any() for r in test]))
    if task == "det":
        return 0.0
    if data.kind != "multiclass":
        return 0.5
    y = np.asarray(data.labels)
    majority = int(np.argmax(np.bincount(y[_rows_of(data, "train")])))
    return float(np.mean(y[test] == majority))


def _finite_or_none(obj):
    """`obj` with every NaN or infinite float replaced by None, through dicts and lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def cell_record(result: dict, metric: str, not_evaluable: str | None = None) -> dict:
    """An evaluator's `result` as a cell writes it: strict JSON (docs/contracts.md, "Metrics").

    ``metric`` is null, with ``not_evaluable`` holding the reason, where `not_evaluable` is given (a test
    subset with a single class) or the evaluator returned no finite value; ``<metric>_sd`` is then null too.
    Every other undefined float (a seed's metric, an AP at one IoU, an all-NaN validation loss) is null.
    The bootstrap evidence ``cases`` (arrays, for :func:`mflag.stats.replicates`) is not part of the record.
    """
    out = _finite_or_none({k: v for k, v in result.items() if k != "cases"})
    value = result.get(metric)
    if not_evaluable is None and metric in result and out[metric] is None:
        not_evaluable = f"the evaluator returned {value!r} for {metric} on the test subset"
    if not_evaluable is not None:
        out[metric] = None
        if f"{metric}_sd" in out:
            out[f"{metric}_sd"] = None
        out["not_evaluable"] = not_evaluable
    return out
