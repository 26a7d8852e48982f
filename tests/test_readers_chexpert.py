"""CheXpert reader on hand-made CSVs with the real 19 columns."""

from __future__ import annotations

from pathlib import Path

import pytest

from mflag.data.chexpert import read_chexpert
from mflag.data.table import DataError

HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
    "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
    "Pleural Effusion,Pleural Other,Fracture,Support Devices\n"
)
LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


def _row(path, view, ap, *, ate="", card="", cons="", edema="", eff=""):
    # column order of the real file
    cells = [
        path, "Female", "68", view, ap, "",  # Path .. No Finding
        "", card, "1.0", "", edema, cons, "", ate, "0.0", eff, "", "", "1.0",
    ]
    return ",".join(cells) + "\n"


def _write(root: Path, folder: str, train_rows: list[str], valid_rows: list[str]) -> None:
    d = root / folder
    d.mkdir(parents=True)
    (d / "train.csv").write_text(HEADER + "".join(train_rows))
    (d / "valid.csv").write_text(HEADER + "".join(valid_rows))


P = "CheXpert-v1.0-small"


def test_uncertainty_policy_row_by_row(tmp_path):
    train = [
        # all blank -> 0
        _row(f"{P}/train/patient00001/study1/view1_frontal.jpg", "Frontal", "AP"),
        # lateral of the same study: excluded
        _row(f"{P}/train/patient00001/study1/view2_lateral.jpg", "Lateral", "", ate="1.0"),
        # -1 everywhere: U-Ones for Atelectasis/Edema/Effusion,
        # U-Zeros for Cardiomegaly/Consolidation
        _row(
            f"{P}/train/patient00002/study1/view1_frontal.jpg", "Frontal", "PA",
            ate="-1.0", card="-1.0", cons="-1.0", edema="-1.0", eff="-1.0",
        ),
        # positives and explicit negatives
        _row(
            f"{P}/train/patient00003/study2/view1_frontal.jpg", "Frontal", "AP",
            ate="0.0", card="1.0", cons="1.0", edema="0.0", eff="1",
        ),
        # a value that is not a label: dropped
        _row(f"{P}/train/patient00004/study1/view1_frontal.jpg", "Frontal", "AP", edema="2.0"),
        _row(f"{P}/train/patient00005/study1/view1_frontal.jpg", "Frontal", "AP", card="yes"),
    ]
    valid = [
        _row(f"{P}/valid/patient64541/study1/view1_frontal.jpg", "Frontal", "AP", eff="1.0"),
        _row(f"{P}/valid/patient64541/study1/view2_lateral.jpg", "Lateral", "", eff="1.0"),
    ]
    _write(tmp_path, P, train, valid)
    t = read_chexpert(tmp_path)
    assert list(t.rows.columns) == ["image_id", "patient_id", "path", "official_split", *LABELS]
    r = t.rows.set_index("image_id")
    assert len(r) == 4
    p1 = f"{P}/train/patient00001/study1/view1_frontal.jpg"
    p2 = f"{P}/train/patient00002/study1/view1_frontal.jpg"
    p3 = f"{P}/train/patient00003/study2/view1_frontal.jpg"
    pv = f"{P}/valid/patient64541/study1/view1_frontal.jpg"
    assert r.loc[p1, LABELS].tolist() == [0, 0, 0, 0, 0]
    assert r.loc[p2, LABELS].tolist() == [1, 0, 0, 1, 1]
    assert r.loc[p3, LABELS].tolist() == [0, 1, 1, 0, 1]
    assert r.loc[pv, LABELS].tolist() == [0, 0, 0, 0, 1]
    assert r.loc[p1, "path"] == p1
    assert r.loc[p2, "patient_id"] == "patient00002"
    assert r.loc[pv, "patient_id"] == "patient64541"
    assert r.loc[p1, "official_split"] == "train"
    assert r.loc[pv, "official_split"] == "test"  # valid.csv is the test set
    assert all(str(t.rows[c].dtype) == "int64" for c in LABELS)
    assert t.excluded == {"lateral": 2}
    assert sorted(t.dropped) == [
        (f"{P}/train/patient00004/study1/view1_frontal.jpg", "bad label"),
        (f"{P}/train/patient00005/study1/view1_frontal.jpg", "bad label"),
    ]


def test_prefers_small_and_accepts_full(tmp_path):
    full = "CheXpert-v1.0"
    row = _row(f"{full}/train/patient00009/study1/view1_frontal.jpg", "Frontal", "PA")
    _write(tmp_path, full, [row], [])
    t = read_chexpert(tmp_path)
    assert t.rows["path"].tolist() == [f"{full}/train/patient00009/study1/view1_frontal.jpg"]
    row = _row(f"{P}/train/patient00001/study1/view1_frontal.jpg", "Frontal", "PA")
    _write(tmp_path, P, [row], [])
    t = read_chexpert(tmp_path)
    assert t.rows["path"].tolist() == [f"{P}/train/patient00001/study1/view1_frontal.jpg"]


def test_errors_name_file_and_column(tmp_path):
    with pytest.raises(DataError, match="CheXpert-v1.0-small"):
        read_chexpert(tmp_path)
    d = tmp_path / P
    d.mkdir()
    (d / "train.csv").write_text(HEADER)
    with pytest.raises(DataError, match="valid.csv"):
        read_chexpert(tmp_path)
    (d / "valid.csv").write_text(HEADER.replace(",Edema,", ",Oedema,"))
    with pytest.raises(DataError, match=r"valid\.csv.*'Edema'"):
        read_chexpert(tmp_path)
    row = _row(f"{P}/valid/nobody/study1/view1_frontal.jpg", "Frontal", "AP")
    (d / "valid.csv").write_text(HEADER + row)
    with pytest.raises(DataError, match=r"valid\.csv: line 2"):
        read_chexpert(tmp_path)
