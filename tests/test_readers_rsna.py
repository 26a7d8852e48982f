"""RSNA pneumonia reader on a hand-made stage_2_train_labels.csv."""

from __future__ import annotations

import pytest

from mflag.data.rsna import read_rsna
from mflag.data.table import DataError

LABELS = """patientId,x,y,width,height,Target
0004cfab-14fd-4e49-80ba-63a80b6bddd6,,,,,0
00436515-870c-4b36-a041-de91049b9ab4,264.0,152.0,213.0,379.0,1
00436515-870c-4b36-a041-de91049b9ab4,562.0,152.0,256.0,453.0,1
00704310-78a8-4b38-8475-49f4573b2dbb,323.0,577.0,160.0,104.0,1
badpositive-0000,,,,,1
badnegative-0000,10,10,5,5,0
badtarget-0000,,,,,maybe
"""


def test_read_rsna(tmp_path):
    (tmp_path / "stage_2_train_labels.csv").write_text(LABELS)
    t = read_rsna(tmp_path)
    assert list(t.rows.columns) == ["image_id", "patient_id", "path", "official_split", "target"]
    r = t.rows.set_index("image_id")
    assert r.index.tolist() == sorted(r.index)
    assert len(r) == 3
    neg = "0004cfab-14fd-4e49-80ba-63a80b6bddd6"
    two = "00436515-870c-4b36-a041-de91049b9ab4"
    one = "00704310-78a8-4b38-8475-49f4573b2dbb"
    assert r.loc[neg, "target"] == 0 and r.loc[two, "target"] == 1 and r.loc[one, "target"] == 1
    assert r.loc[two, "patient_id"] == two
    assert r.loc[two, "path"] == f"stage_2_train_images/{two}.dcm"
    assert set(r["official_split"]) == {""}
    assert t.boxes == {
        two: [(264.0, 152.0, 477.0, 531.0), (562.0, 152.0, 818.0, 605.0)],
        one: [(323.0, 577.0, 483.0, 681.0)],
    }
    assert neg not in t.boxes
    assert sorted(t.dropped) == [
        ("stage_2_train_images/badnegative-0000.dcm", "bad label"),
        ("stage_2_train_images/badpositive-0000.dcm", "bad label"),
        ("stage_2_train_images/badtarget-0000.dcm", "bad label"),
    ]


def test_rsna_errors(tmp_path):
    with pytest.raises(DataError, match="stage_2_train_labels.csv"):
        read_rsna(tmp_path)
    (tmp_path / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height\nabc,,,,\n")
    with pytest.raises(DataError, match=r"stage_2_train_labels\.csv.*'Target'"):
        read_rsna(tmp_path)
    header = "patientId,x,y,width,height,Target\n"
    (tmp_path / "stage_2_train_labels.csv").write_text(header + ",,,,,0\n")
    with pytest.raises(DataError, match=r"line 2"):
        read_rsna(tmp_path)
