"""NIH ChestX-ray14: ``Data_Entry_2017.csv``, ``train_val_list.txt``, ``test_list.txt`` and the PNGs.

Layout under ``root`` (docs/contracts.md):

- the label file, ``Data_Entry_2017_v2020.csv`` (the 2020 re-release, corrected patient ages) or
  ``Data_Entry_2017.csv``; where both are present the v2020 file is read (and the other ignored). Only
  ``Image Index``, ``Finding Labels`` and ``Patient ID`` are read; the 2017 file's trailing empty column and
  the split ``OriginalImage[Width,Height]`` / ``OriginalImagePixelSpacing[x,y]`` headers do no harm;
- ``train_val_list.txt`` and ``test_list.txt``, one ``Image Index`` per line: the official split. The test
  list is the test set; the train_val list is the pool that the split stage draws a patient-level valid set
  from (``data.nih.valid_fraction``). An image in both lists is a test image; an image in neither is excluded
  (counted as ``not_in_lists``), as is a listed image without a row in the label file (``not_in_data_entry``);
- the images, in ``images/`` or spread over ``images_001/images/`` ... ``images_012/images/`` (any
  ``images_*/images/`` folder): each image is looked up by its file name wherever it is (``images/`` first, then
  the numbered folders in name order); a labelled, listed image found nowhere is dropped as a missing file;
- ``BBox_List_2017.csv`` (boxes for 880 test images) is not read: classification needs none.

Labels: the 14 findings, named as NIH names them, from the pipe-separated ``Finding Labels``;
``No Finding`` is all zero. An empty cell, an unknown name, or ``No Finding`` together with a finding drops
the row as a bad label.
"""

from __future__ import annotations

import os
from pathlib import Path

from .table import (
    BAD_LABEL,
    DUPLICATE_ROW,
    MISSING_FILE,
    DataError,
    DatasetTable,
    drop_if_outside,
    line_of,
    make_table,
    read_csv_strings,
    require_file,
)

LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
NO_FINDING = "No Finding"
DATA_ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  # the first present is read
LISTS = (("test_list.txt", "test"), ("train_val_list.txt", "train"))  # test first: it wins a conflict
REQUIRED = ("Image Index", "Finding Labels", "Patient ID")


def find_data_entry(root: Path) -> Path:
    """The label file: the v2020 name where present, else the 2017 one."""
    for name in DATA_ENTRY_FILES:
        if (Path(root) / name).is_file():
            return Path(root) / name
    raise DataError(f"{root}: contains neither {DATA_ENTRY_FILES[0]} nor {DATA_ENTRY_FILES[1]} (data.nih.root "
                    "must be the folder holding the NIH ChestX-ray14 files)")  # fmt: skip


def parse_findings(value: str) -> dict[str, int] | None:
    """The 14 labels (0/1) of a ``Finding Labels`` cell; None for an empty cell, an unknown name, or
    ``No Finding`` together with a finding."""
    names = [v.strip() for v in value.split("|")]
    if not value.strip() or any(not n for n in names):
        return None
    if NO_FINDING in names:
        return dict.fromkeys(LABELS, 0) if set(names) == {NO_FINDING} else None
    if any(n not in LABELS for n in names):
        return None
    return {c: int(c in names) for c in LABELS}


def read_list(path: Path) -> list[str]:
    """The image names of an official list, in file order (blank lines skipped)."""
    require_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    return [line.strip() for line in text.splitlines() if line.strip()]


def image_folders(root: Path) -> list[str]:
    """The folders holding images, relative to ``root``: ``images`` then ``images_*/images`` in name order."""
    root = Path(root)
    found = ["images"] if (root / "images").is_dir() else []
    numbered = sorted(d.name for d in os.scandir(root) if d.name.startswith("images_") and d.is_dir())
    return found + [f"{n}/images" for n in numbered if (root / n / "images").is_dir()]


def index_images(root: Path) -> dict[str, str]:
    """File name -> its path relative to ``root``, over every image folder (the first folder holding a name
    wins). One directory listing per folder: no per-image file-system call."""
    where: dict[str, str] = {}
    for folder in image_folders(root):
        with os.scandir(Path(root) / folder) as entries:
            names = sorted(e.name for e in entries if e.is_file())
        for name in names:
            where.setdefault(name, f"{folder}/{name}")
    return where


def read_nih(root: Path) -> DatasetTable:
    root = Path(root)
    csv_path = find_data_entry(root)
    df = read_csv_strings(csv_path, REQUIRED)
    official: dict[str, str] = {}
    for list_name, split in LISTS:
        for name in read_list(root / list_name):
            official.setdefault(name, split)
    where = index_images(root)

    records: list[dict] = []
    dropped: list[tuple[str, str]] = []
    excluded = {"not_in_lists": 0, "not_in_data_entry": 0}
    seen: set[str] = set()  # names kept (or excluded by the protocol) so far
    in_csv: set[str] = set()
    cols = zip(df["Image Index"], df["Finding Labels"], df["Patient ID"])
    for i, (name, findings, patient) in enumerate(cols):
        name, patient = name.strip(), patient.strip()
        if not name:
            raise DataError(f"{csv_path}: line {line_of(i)}: empty Image Index")
        in_csv.add(name)
        if drop_if_outside(root, name, dropped):
            continue
        if not patient:
            raise DataError(f"{csv_path}: line {line_of(i)}: empty Patient ID for {name!r}")
        path = where.get(name, name)  # the name alone where no image folder holds it
        if name in seen:
            dropped.append((path, DUPLICATE_ROW))
            continue
        labels = parse_findings(findings)
        if labels is None:
            dropped.append((path, BAD_LABEL))
            continue
        seen.add(name)
        if name not in official:
            excluded["not_in_lists"] += 1
            continue
        if name not in where:
            dropped.append((path, MISSING_FILE))
            continue
        records.append(
            {"image_id": name, "patient_id": patient, "path": path, "official_split": official[name], **labels}
        )
    excluded["not_in_data_entry"] = sum(1 for name in official if name not in in_csv)
    return make_table(
        records,
        LABELS,
        int_labels=LABELS,
        source=str(csv_path),
        dropped=dropped,
        excluded=excluded,
        sources={split: root / list_name for list_name, split in LISTS},
    )
