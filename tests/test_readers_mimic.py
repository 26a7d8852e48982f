"""MIMIC-CXR reader on hand-made files in the real layout (reports as MIMIC ships them)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from mflag.data.mimic import read_mimic, report_text, section_report
from mflag.data.table import DataError

TWO_SECTIONS = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___F with cough
 
 TECHNIQUE:  Chest PA and lateral
 
 COMPARISON:  None.
 
 FINDINGS:
 
 The lungs are clear.  No pleural effusion
 or pneumothorax.
 
 IMPRESSION:
 
 No acute cardiopulmonary process.
"""

ONLY_IMPRESSION = """                                 FINAL REPORT
 INDICATION:  Fever.
 
 IMPRESSION:  Right lower lobe pneumonia.
"""

FINDINGS_AND_IMPRESSION = """                                 FINAL REPORT
 HISTORY:  Dyspnea.
 
 FINDINGS AND IMPRESSION:  Moderate cardiomegaly
 with mild pulmonary edema.
"""

CONCLUSION = """ FINAL REPORT
 COMPARISON:  Prior study.
 
 FINDINGS:  Small left effusion.
 
 CONCLUSION:  Small left pleural effusion.
"""

REPEATED_IMPRESSION = """ FINAL REPORT
 IMPRESSION:  Preliminary read: possible opacity.
 
 FINDINGS:  Patchy opacity at the left base.
 
 IMPRESSION:  Left basilar atelectasis.
"""

NO_SECTION = """                                 FINAL REPORT
 PORTABLE CHEST RADIOGRAPH ON ___

 Comparison is made to the prior study.
   
 Lines and tubes are in unchanged position.
 Lungs are clear.
"""

EMPTY = """                                 FINAL REPORT
 
"""


def test_two_sections_impression_first():
    s = section_report(TWO_SECTIONS)
    assert s["findings"] == "The lungs are clear. No pleural effusion or pneumothorax."
    assert s["impression"] == "No acute cardiopulmonary process."
    assert s["examination"] == "CHEST (PA AND LAT)"
    assert s["indication"] == "___F with cough"
    assert report_text(TWO_SECTIONS) == (
        "No acute cardiopulmonary process. "
        "The lungs are clear. No pleural effusion or pneumothorax."
    )


def test_only_impression():
    assert report_text(ONLY_IMPRESSION) == "Right lower lobe pneumonia."


def test_findings_and_impression_counts_as_impression():
    s = section_report(FINDINGS_AND_IMPRESSION)
    assert s["impression"] == "Moderate cardiomegaly with mild pulmonary edema."
    assert "findings" not in s
    assert report_text(FINDINGS_AND_IMPRESSION) == s["impression"]


def test_conclusion_is_impression():
    assert report_text(CONCLUSION) == "Small left pleural effusion. Small left effusion."


def test_repeated_impression_last_wins():
    assert report_text(REPEATED_IMPRESSION) == (
        "Left basilar atelectasis. Patchy opacity at the left base."
    )


def test_no_section_falls_back_to_last_paragraph():
    # the paragraph break is a line of spaces only
    assert report_text(NO_SECTION) == "Lines and tubes are in unchanged position. Lungs are clear."


def test_header_only_lines_and_empty_report():
    assert report_text(EMPTY) == ""
    assert report_text("FINAL REPORT\n\nIMPRESSION:\n") == ""
    assert report_text(" FINAL REPORT\n Heart size normal.\n") == "Heart size normal."


@pytest.mark.parametrize(
    "header, section",
    [
        ("IMPRESSIONS", "impression"),
        ("CONCLUSIONS", "impression"),
        ("SUMMARY", "impression"),
        ("FINDINGS/IMPRESSION", "impression"),
        ("FINDING", "findings"),
        ("PA AND LATERAL VIEWS OF THE CHEST", "findings"),
        ("CLINICAL HISTORY", "history"),
        ("REASON FOR EXAM", "indication"),
    ],
)
def test_synonyms(header, section):
    s = section_report(f" FINAL REPORT\n {header}:  Text here.\n")
    assert s[section] == "Text here."


def test_headers_only_at_line_start():
    txt = " FINDINGS:  Discussed with Dr. ___ at 10:30 NOTE: not a header.\n"
    assert section_report(txt)["findings"] == "Discussed with Dr. ___ at 10:30 NOTE: not a header."


# --------------------------------------------------------------------------- the reader

SPLIT_HEADER = "dicom_id,study_id,subject_id,split\n"
META_HEADER = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
    "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
    "PatientOrientationCodeSequence_CodeMeaning\n"
)


def _meta_row(dicom, subject, study, view):
    return (
        f"{dicom},{subject},{study},CHEST (PA AND LAT),{view},3056,2544,21800506,213014.531,"
        "CHEST (PA AND LAT),postero-anterior,Erect\n"
    )


def _write(path: Path, text: str, gz: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


def _report(root: Path, subject: str, study: str, text: str) -> None:
    p = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def _corpus(root: Path, gz: bool) -> None:
    studies = [
        # dicom, subject, study, split, view, report
        ("d-pa", "10000032", "50414267", "train", "PA", TWO_SECTIONS),
        ("d-lat", "10000032", "50414267", "train", "LATERAL", TWO_SECTIONS),
        ("d-ap", "11000011", "51000001", "validate", "AP", ONLY_IMPRESSION),
        ("d-test", "12000022", "52000002", "test", "PA", NO_SECTION),
        ("d-empty", "13000033", "53000003", "train", "PA", EMPTY),
        ("d-noreport", "14000044", "54000004", "train", "AP", None),
        ("d-ll", "15000055", "55000005", "train", "LL", REPEATED_IMPRESSION),
        ("d-other", "15000055", "55000005", "train", "", REPEATED_IMPRESSION),
    ]
    split = SPLIT_HEADER + "".join(f"{d},{st},{su},{sp}\n" for d, su, st, sp, _, _ in studies)
    meta = META_HEADER + "".join(_meta_row(d, su, st, v) for d, su, st, _, v, _ in studies)
    meta += _meta_row("d-outside", "16000066", "56000006", "PA")  # not in the split file
    _write(root / "mimic-cxr-2.0.0-split.csv", split, gz)
    _write(root / "mimic-cxr-2.0.0-metadata.csv", meta, gz)
    for _, su, st, _, _, rep in studies:
        if rep is not None:
            _report(root, su, st, rep)


@pytest.mark.parametrize("gz", [True, False])
def test_read_mimic(tmp_path, gz):
    _corpus(tmp_path, gz)
    t = read_mimic(tmp_path)
    rows = t.rows
    assert list(rows.columns) == ["image_id", "patient_id", "path", "official_split", "text"]
    assert rows["image_id"].tolist() == ["d-ap", "d-pa", "d-test"]  # sorted
    r = rows.set_index("image_id")
    assert r.loc["d-pa", "path"] == "files/p10/p10000032/s50414267/d-pa.jpg"
    assert r.loc["d-pa", "patient_id"] == "10000032"
    assert r.loc["d-pa", "official_split"] == "train"
    assert r.loc["d-ap", "official_split"] == "valid"
    assert r.loc["d-test", "official_split"] == "test"
    assert r.loc["d-ap", "text"] == "Right lower lobe pneumonia."
    assert r.loc["d-test", "text"] == "Lines and tubes are in unchanged position. Lungs are clear."
    assert sorted(t.dropped) == [
        ("files/p13/p13000033/s53000003/d-empty.jpg", "empty report"),
        ("files/p14/p14000044/s54000004/d-noreport.jpg", "missing report"),
    ]
    assert t.excluded["lateral"] == 2
    assert t.excluded["other_view"] == 1
    assert t.excluded["not_in_split"] == 1
    assert t.boxes == {} and t.rles == {}


def test_missing_files_and_columns(tmp_path):
    with pytest.raises(DataError, match="mimic-cxr-2.0.0-split"):
        read_mimic(tmp_path)
    _corpus(tmp_path, gz=False)
    (tmp_path / "mimic-cxr-2.0.0-metadata.csv").write_text("dicom_id,subject_id,study_id\nx,1,2\n")
    with pytest.raises(DataError, match=r"ViewPosition.*metadata|metadata.*ViewPosition"):
        read_mimic(tmp_path)


def test_bad_split_value_names_row(tmp_path):
    _corpus(tmp_path, gz=False)
    p = tmp_path / "mimic-cxr-2.0.0-split.csv"
    p.write_text(p.read_text() + "d-x,50000000,10000000,holdout\n")
    with pytest.raises(DataError, match=r"split\.csv.*line 10"):
        read_mimic(tmp_path)
