"""COVIDx (release 9A): ``train_COVIDx9A.txt`` / ``test_COVIDx9A.txt`` and ``train/``, ``test/``.

Each list line is ``patient_id filename label source`` separated by spaces, without a header.
"""

from __future__ import annotations

from pathlib import Path

from .table import (
    BAD_LABEL,
    DUPLICATE_ROW,
    DataError,
    DatasetTable,
    drop_if_outside,
    make_table,
    require_file,
)

LISTS = (("train_COVIDx9A.txt", "train", "train"), ("test_COVIDx9A.txt", "test", "test"))
CLASSES = ("normal", "pneumonia", "COVID-19")


def read_covidx(root: Path) -> DatasetTable:
    root = Path(root)
    records: list[dict] = []
    dropped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for list_name, folder, split in LISTS:
        list_path = require_file(root / list_name)
        try:
            text = list_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{list_path}: cannot read: {e}") from e
        for lineno, line in enumerate(text.splitlines(), start=1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) < 4:
                raise DataError(
                    f"{list_path}: line {lineno}: expected 'patient_id filename label source', "
                    f"got {line.strip()!r}"
                )
            # A file name holding spaces would split into several tokens: re-join the middle.
            patient_id, label, filename = tokens[0], tokens[-2], " ".join(tokens[1:-2])
            image_id = f"{folder}/{filename}"
            if drop_if_outside(root, image_id, dropped):
                continue
            if label not in CLASSES:
                dropped.append((image_id, BAD_LABEL))
                continue
            if image_id in seen:
                dropped.append((image_id, DUPLICATE_ROW))
                continue
            seen.add(image_id)
            records.append(
                {
                    "image_id": image_id,
                    "patient_id": patient_id,
                    "path": image_id,
                    "official_split": split,
                    "label": label,
                }
            )
    sources = {split: root / list_name for list_name, _, split in LISTS}
    return make_table(records, ["label"], source=str(root), dropped=dropped, sources=sources)
