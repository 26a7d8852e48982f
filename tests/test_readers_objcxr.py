"""Object-CXR reader on hand-made train.csv / dev.csv."""

from __future__ import annotations

import pytest

from mflag.data.objcxr import read_objcxr
from mflag.data.table import DataError
from mflag.data.objcxr import parse_annotation

TRAIN = (
    "image_name,annotation\n"
    "00001.jpg,0 1069 1269 1113 1316\n"
    "00002.jpg,\n"
    "00003.jpg,1 100 200 150 260;2 300 400 320 380 340 420 310 430\n"
    "00004.jpg,3 1 2 3 4\n"
    "00005.jpg,2 1 2 3\n"
    "00006.jpg,0 10 20 abc 40\n"
)
DEV = "image_name,annotation\n08001.jpg,0 50 60 40 70;\n08002.jpg,\n"


def test_parse_annotation():
    assert parse_annotation("") == []
    assert parse_annotation("0 1 2 3 4") == [(1.0, 2.0, 3.0, 4.0)]
    assert parse_annotation("2 5 5 1 9 8 2") == [(1.0, 2.0, 8.0, 9.0)]
    with pytest.raises(ValueError):
        parse_annotation("1 1 2 3")


def test_read_objcxr(tmp_path):
    (tmp_path / "train.csv").write_text(TRAIN)
    (tmp_path / "dev.csv").write_text(DEV)
    t = read_objcxr(tmp_path)
    assert list(t.rows.columns) == ["image_id", "patient_id", "path", "official_split", "target"]
    r = t.rows.set_index("image_id")
    assert r.index.tolist() == [
        "dev/08001.jpg",
        "dev/08002.jpg",
        "train/00001.jpg",
        "train/00002.jpg",
        "train/00003.jpg",
    ]
    assert r["target"].tolist() == [1, 0, 1, 0, 1]
    assert r.loc["dev/08001.jpg", "official_split"] == "test"
    assert r.loc["train/00001.jpg", "official_split"] == "train"
    assert r.loc["train/00001.jpg", "patient_id"] == "00001.jpg"
    assert r.loc["dev/08002.jpg", "path"] == "dev/08002.jpg"
    assert t.boxes == {
        "train/00001.jpg": [(1069.0, 1269.0, 1113.0, 1316.0)],
        "train/00003.jpg": [(100.0, 200.0, 150.0, 260.0), (300.0, 380.0, 340.0, 430.0)],
        "dev/08001.jpg": [(40.0, 60.0, 50.0, 70.0)],
    }
    assert sorted(t.dropped) == [
        ("train/00004.jpg", "bad label"),
        ("train/00005.jpg", "bad label"),
        ("train/00006.jpg", "bad label"),
    ]


def test_objcxr_errors(tmp_path):
    with pytest.raises(DataError, match="train.csv"):
        read_objcxr(tmp_path)
    (tmp_path / "train.csv").write_text("image_name,annotation\n")
    (tmp_path / "dev.csv").write_text("image_name,label\n08001.jpg,\n")
    with pytest.raises(DataError, match=r"dev\.csv.*'annotation'"):
        read_objcxr(tmp_path)
