"""COVIDx 9A reader on hand-made header-less space-separated lists."""

from __future__ import annotations

import pytest

from mflag.data.covidx import read_covidx
from mflag.data.table import DataError

TRAIN = (
    "3 SARS-10.1148rg.242035193-g04mr34g0-Fig8a-day0.jpeg pneumonia cohen\n"
    "5 e0d0a6a1-aa3b-4c7f-9f53-5d0bdb7b1e1d.png normal rsna   \n"
    "\n"
    "COVID-00012 covid-19-pneumonia-15-PA.jpg COVID-19 cohen\n"
    "7 shared.png normal rsna\n"
    "8 weird.png viral-pneumonia sirm\n"
    "   \n"
)
TEST = "419639-003251 shared.png COVID-19 ricord\n9 dup.png normal rsna\n9 dup.png normal rsna\n"


def test_read_covidx(tmp_path):
    (tmp_path / "train_COVIDx9A.txt").write_text(TRAIN)
    (tmp_path / "test_COVIDx9A.txt").write_text(TEST)
    t = read_covidx(tmp_path)
    assert list(t.rows.columns) == ["image_id", "patient_id", "path", "official_split", "label"]
    r = t.rows.set_index("image_id")
    assert r.index.tolist() == sorted(r.index)
    assert len(r) == 6
    # the same file name in both lists stays two distinct images
    assert r.loc["train/shared.png", "label"] == "normal"
    assert r.loc["test/shared.png", "label"] == "COVID-19"
    assert r.loc["test/shared.png", "patient_id"] == "419639-003251"
    assert r.loc["test/shared.png", "official_split"] == "test"
    assert r.loc["train/shared.png", "official_split"] == "train"
    assert r.loc["train/covid-19-pneumonia-15-PA.jpg", "patient_id"] == "COVID-00012"
    e = "train/e0d0a6a1-aa3b-4c7f-9f53-5d0bdb7b1e1d.png"
    assert r.loc[e, "path"] == e and r.loc[e, "label"] == "normal"
    assert set(r["label"]) == {"normal", "pneumonia", "COVID-19"}
    assert ("train/weird.png", "bad label") in t.dropped
    assert ("test/dup.png", "duplicate row") in t.dropped


def test_covidx_errors(tmp_path):
    with pytest.raises(DataError, match="train_COVIDx9A.txt"):
        read_covidx(tmp_path)
    (tmp_path / "train_COVIDx9A.txt").write_text(TRAIN)
    with pytest.raises(DataError, match="test_COVIDx9A.txt"):
        read_covidx(tmp_path)
    (tmp_path / "test_COVIDx9A.txt").write_text("1 a.png normal rsna\n2 b.png\n")
    with pytest.raises(DataError, match=r"test_COVIDx9A\.txt: line 2"):
        read_covidx(tmp_path)
