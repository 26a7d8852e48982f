"""A downstream job's data: one dataset's uint8 cache, its labels, and the rows of each split; and how the
evaluators turn its grey levels into an encoder's input.

The train rows of a data fraction p are the cache rows with `pct <= p` (docs/contracts.md: nested subsets).
An encoder's input is the grey image in [0, 1], replicated to 3 channels, normalised per channel as
``(x - mean_c) / std_c`` with the encoder's own ``mean`` and ``std`` (the encoders trained here: 0.5, 0.5;
torchvision's ImageNet weights: 0.485 / 0.456 / 0.406 and 0.229 / 0.224 / 0.225).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mflag.data import LABEL_COLUMNS

COVIDX_CLASSES = ("normal", "pneumonia", "COVID-19")
HALF = (0.5, 0.5, 0.5)  # the default mean and std: the pipeline's own normalisation (x / 127.5 - 1 on grey levels)


def passes_per_epoch(n_train: int, min_epoch_images: int) -> int:
    """How many passes over an `n_train`-image training subset make one epoch of at least `min_epoch_images`.

    Why: at a fixed number of epochs a 1 % subset gets a hundredth of the 100 % cell's optimiser steps (the
    demo's 3 segmentation epochs at 1 % were 6 steps, and the decoder never left its initial state); cycling
    a small subset, a fresh permutation per pass, gives every fraction a comparable number of steps."""
    if n_train <= 0:
        raise ValueError(f"no training images (n_train = {n_train})")
    return max(1, math.ceil(min_epoch_images / n_train))


@dataclass
class TaskData:
    dataset: str
    images: np.ndarray  # (N, S, S) uint8, memory-mapped
    index: pd.DataFrame
    train_rows: np.ndarray  # rows of the fraction
    valid_rows: np.ndarray
    test_rows: np.ndarray
    labels: np.ndarray | None = None  # cls: (N, K) float 0/1, (N,) float 0/1 or (N,) int class ids
    kind: str = ""  # multilabel | binary | multiclass
    masks: np.ndarray | None = None  # seg: (N, S, S) uint8
    boxes: dict[int, np.ndarray] = field(default_factory=dict)  # det: row -> (n, 4) x1, y1, x2, y2
    pct: np.ndarray | None = None  # (N,) float: each row's smallest fraction, NaN outside train

    def at_fraction(self, pct: int) -> TaskData:
        """The same data with the train rows of one fraction (nested: the rows with `pct <= p`)."""
        return dataclasses.replace(self, train_rows=self.train_rows[self.pct[self.train_rows] <= pct])


def load_task_data(cache_dir: Path, dataset: str, task: str, pct: int = 100) -> TaskData:
    """A job's data from its dataset's cache; train rows of fraction `pct` (others by `at_fraction`)."""
    index = pd.read_csv(cache_dir / "index.csv", dtype={"image_id": str, "patient_id": str}, keep_default_na=False)
    split = index["split"].to_numpy()
    pct_col = pd.to_numeric(index["pct"], errors="coerce").to_numpy()
    data = TaskData(
        dataset=dataset,
        images=np.load(cache_dir / "images.npy", mmap_mode="r"),
        index=index,
        train_rows=np.flatnonzero((split == "train") & (pct_col <= pct)),
        valid_rows=np.flatnonzero(split == "valid"),
        test_rows=np.flatnonzero(split == "test"),
        pct=pct_col,
    )
    if task == "cls":
        cols = LABEL_COLUMNS[dataset]
        if dataset == "covidx":
            lookup = {c: i for i, c in enumerate(COVIDX_CLASSES)}
            data.labels, data.kind = index["label"].map(lookup).to_numpy(np.int64), "multiclass"
        elif len(cols) == 1:
            data.labels, data.kind = index[cols[0]].astype(float).to_numpy(np.float32), "binary"
        else:
            data.labels, data.kind = index[list(cols)].astype(float).to_numpy(np.float32), "multilabel"
    elif task == "seg":
        data.masks = np.load(cache_dir / "masks.npy", mmap_mode="r")
    elif task == "det":
        boxes = pd.read_csv(cache_dir / "boxes.csv", dtype={"image_id": str})
        row_of = {image_id: i for i, image_id in enumerate(index["image_id"])}
        for image_id, g in boxes.groupby("image_id", sort=False):
            data.boxes[row_of[image_id]] = g[["x1", "y1", "x2", "y2"]].to_numpy(np.float32)
    return data


# ------------------------------------------------------------------------------------------ normalisation
def check_normalisation(config: object) -> None:
    """Validate a (frozen) evaluator config's ``mean`` and ``std`` and store them as tuples of 3 floats (so that
    lists, as params give them, compare equal to tuples)."""
    name = type(config).__name__
    for field_name in ("mean", "std"):
        value = getattr(config, field_name)
        try:
            values = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}.{field_name} must be 3 numbers (one per channel), got {value!r}") from None
        if len(values) != 3 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"{name}.{field_name} must be 3 finite numbers (one per channel), got {value!r}")
        if field_name == "std" and min(values) <= 0:
            raise ValueError(f"{name}.std must be > 0 in every channel, got {value!r}")
        object.__setattr__(config, field_name, values)


def _is_half(mean: tuple[float, ...], std: tuple[float, ...]) -> bool:
    return tuple(mean) == HALF and tuple(std) == HALF


def _per_channel(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)


def normalise_grey(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Grey levels (B, 1, H, W) in [0, 255] (float) -> the encoder's input (B, 3, H, W): ``(x / 255 - mean_c) /
    std_c``. With the default mean = std = 0.5 it is ``x / 127.5 - 1`` expanded to 3 channels (a view), the
    evaluators' historical operations, bit for bit."""
    if _is_half(mean, std):
        return (x / 127.5 - 1.0).expand(-1, 3, -1, -1)
    return (x / 255.0 - _per_channel(mean, x)) / _per_channel(std, x)


def renormalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Images (B, 3, H, W) normalised with mean = std = 0.5 (values in [-1, 1]) -> normalised with ``mean``,
    ``std``: ``((x + 1) / 2 - mean_c) / std_c``. The same tensor, untouched, for the default."""
    if _is_half(mean, std):
        return x
    return ((x + 1.0) * 0.5 - _per_channel(mean, x)) / _per_channel(std, x)


def fingerprint_test_set(data: TaskData) -> str:
    """A fingerprint of the test cases, in order (a cell's `test_set`): collation pairs only cells scored on the
    same ones."""
    ids = "\n".join(data.index["image_id"].iloc[data.test_rows].astype(str))
    return hashlib.sha256(ids.encode()).hexdigest()[:16]
