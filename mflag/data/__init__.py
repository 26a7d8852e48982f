"""Readers for the on-disk layouts of the seven chest X-ray datasets, and image decoding.

Each dataset's reader lives in its own module, ``mflag.data.<dataset>.read_<dataset>``, and this package
imports none of them: a stage imports only the reader it runs, so its DVC deps (``mflag/data/${key}.py``)
name exactly the code it executes.
"""

from __future__ import annotations

import importlib
from typing import Callable

# The split file's label columns per dataset (docs/contracts.md), used to stratify the nested fractions.
LABEL_COLUMNS: dict[str, tuple[str, ...]] = {
    "mimic": (),
    "chexpert": ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"),
    "rsna": ("target",),
    "siim": ("target",),
    "covidx": ("label",),
    "objcxr": ("target",),
    "nih": (
        "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
        "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
    ),  # fmt: skip
}


def reader(dataset: str) -> Callable:
    """The reader of a dataset key, ``mflag.data.<dataset>.read_<dataset>`` (a DatasetTable from a root)."""
    if dataset not in LABEL_COLUMNS:
        raise KeyError(f"unknown dataset {dataset!r}; one of {', '.join(LABEL_COLUMNS)}")
    return getattr(importlib.import_module(f"{__name__}.{dataset}"), f"read_{dataset}")
