"""A downstream job's data: one dataset's uint8 cache, its labels, and the rows of each split.

The train rows of a data fraction p are the cache rows with `pct <= p` (docs/contracts.md: nested subsets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mflag.data import LABEL_COLUMNS

COVIDX_CLASSES = ("normal", "pneumonia", "COVID-19")


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
