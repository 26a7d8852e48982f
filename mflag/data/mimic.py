"""MIMIC-CXR-JPG 2.0.0 with the free-text reports unpacked into the same ``files/`` tree.

Layout under ``root`` (the ``2.0.0/`` folder)::

    mimic-cxr-2.0.0-split.csv(.gz)      dicom_id, study_id, subject_id, split (train/validate/test)
    mimic-cxr-2.0.0-metadata.csv(.gz)   dicom_id, ..., ViewPosition, ...
    files/p10/p10000032/s50414267.txt                       the study's report
    files/p10/p10000032/s50414267/<dicom_id>.jpg            its images

Report sectioning follows the conventions of the MIT-LCP ``mimic-cxr`` section parser (upper-case
headers followed by a colon at the start of a line, synonyms normalised, the last occurrence of a
section wins), written afresh here.
"""

from __future__ import annotations

import re
from pathlib import Path

from .table import (
    EMPTY_REPORT,
    MISSING_REPORT,
    DataError,
    OUTSIDE_ROOT,
    DatasetTable,
    drop_if_outside,
    escapes_root,
    line_of,
    make_table,
    read_csv_strings,
)

SPLIT_STEM = "mimic-cxr-2.0.0-split"
METADATA_STEM = "mimic-cxr-2.0.0-metadata"
SPLIT_MAP = {"train": "train", "validate": "valid", "valid": "valid", "test": "test"}
FRONTAL_VIEWS = ("PA", "AP")

# A section header: upper-case words (may hold spaces and ()/,&-) then a colon, at the start of a
# line possibly after spaces, followed by whitespace or the end of the text.
_HEADER_RE = re.compile(r"^[ \t]*([A-Z][A-Z ()/,&\-]*[A-Z)])[ \t]*:(?=\s|$)", re.MULTILINE)

# Header names (lower case, single spaces) and the section they stand for.
_SYNONYMS = {
    "impression": "impression",
    "impressions": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
    "summary": "impression",
    "findings and impression": "impression",
    "findings/impression": "impression",
    "findings / impression": "impression",
    "findings/ impression": "impression",
    "impression and findings": "impression",
    "impresson": "impression",
    "imprression": "impression",
    "imoression": "impression",
    "impressoin": "impression",
    "imprssion": "impression",
    "impresion": "impression",
    "imperssion": "impression",
    "mpression": "impression",
    "impession": "impression",
    "findings": "findings",
    "finding": "findings",
    "findins": "findings",
    "findindgs": "findings",
    "findgings": "findings",
    "findngs": "findings",
    "findnings": "findings",
    "finidngs": "findings",
    "reference findings": "findings",
    "chest, two views": "findings",
    "comparison": "comparison",
    "comparisons": "comparison",
    "comparison exam": "comparison",
    "comparison film": "comparison",
    "reference exam": "comparison",
    "comparision": "comparison",
    "comparsion": "comparison",
    "comparrison": "comparison",
    "comparisions": "comparison",
    "indication": "indication",
    "idication": "indication",
    "clinical indication": "indication",
    "reason for exam": "indication",
    "reason for examination": "indication",
    "history": "history",
    "clinical history": "history",
    "clinical information": "history",
    "patient history": "history",
    "pfi": "history",
    "examination": "examination",
    "exam": "examination",
    "type of examination": "examination",
    "technique": "technique",
    "notification": "notification",
    "recommendation": "recommendations",
    "recommendations": "recommendations",
    "recommendation(s)": "recommendations",
    "addendum": "addendum",
    "wet read": "wet read",
    "wetread": "wet read",
    "comment": "comment",
    "date": "date",
}
# Checked in this order when a name is not a known synonym: a name containing one of these is it.
_MAIN_SECTIONS = ("impression", "conclusion", "findings", "history", "comparison", "addendum")
# Header names that describe the whole study ("PA AND LATERAL VIEWS OF THE CHEST:") are findings.
_FINDINGS_LIKE = re.compile(
    r"chest|portable|pa and lateral|lateral and pa|ap and lateral|lateral and ap|frontal and|"
    r"two views|frontal view|pa view|ap view|one view|lateral view|bone window|frontal upright|"
    r"frontal semi-upright|ribs|pa and lat"
)
# Lines that only title the report and carry no content.
_TITLE_LINES = {
    "FINAL REPORT",
    "PRELIMINARY REPORT",
    "REPORT",
    "ADDENDUM",
    "FINAL ADDENDUM",
    "AMENDED REPORT",
    "CORRECTED REPORT",
    "REVISED REPORT",
}
_HEADER_ONLY_RE = re.compile(r"^[A-Z][A-Z ()/,&\-]*:$")


def _collapse(s: str) -> str:
    return " ".join(s.split())


def normalize_section_name(name: str) -> str:
    """Map a raw header (e.g. 'FINDINGS AND IMPRESSION') to its section ('impression')."""
    key = _collapse(name.lower())
    if key in _SYNONYMS:
        return _SYNONYMS[key]
    for main in _MAIN_SECTIONS:
        if main in key:
            return "impression" if main == "conclusion" else main
    if _FINDINGS_LIKE.search(key):
        return "findings"
    return key


def section_report(text: str) -> dict[str, str]:
    """Split a free-text report into ``{section: text}`` with normalised section names.

    Text before the first header is 'preamble'. Whitespace inside a section is collapsed to single
    spaces. When a section occurs several times the last non-empty occurrence wins (an empty
    repeat, e.g. a bare 'FINDINGS:' title line, does not erase earlier text).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    out: dict[str, str] = {}
    matches = list(_HEADER_RE.finditer(text))
    if not matches:
        pre = _collapse(text)
        return {"preamble": pre} if pre else {}
    pre = _collapse(text[: matches[0].start()])
    if pre:
        out["preamble"] = pre
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        name = normalize_section_name(m.group(1))
        body = _collapse(text[m.end() : end])
        if body or name not in out:
            out[name] = body
    return out


def _is_header_only(line: str) -> bool:
    s = _collapse(line)
    return s in _TITLE_LINES or bool(_HEADER_ONLY_RE.match(s))


def last_paragraph(text: str) -> str:
    """The last non-empty paragraph (blank-line separated), title / bare-header lines removed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paragraphs: list[list[str]] = [[]]
    for line in text.split("\n"):
        if line.strip() == "":
            if paragraphs[-1]:
                paragraphs.append([])
        else:
            paragraphs[-1].append(line)
    for para in reversed(paragraphs):
        kept = [ln for ln in para if not _is_header_only(ln)]
        s = _collapse(" ".join(kept))
        if s:
            return s
    return ""


def report_text(text: str) -> str:
    """IMPRESSION then FINDINGS joined by one space; with neither, the last paragraph."""
    sections = section_report(text)
    parts = [sections.get("impression", ""), sections.get("findings", "")]
    joined = " ".join(p for p in parts if p)
    return joined if joined else last_paragraph(text)


def _pick_csv(root: Path, stem: str) -> Path:
    for name in (f"{stem}.csv.gz", f"{stem}.csv"):
        p = root / name
        if p.is_file():
            return p
    raise DataError(f"required file not found: {root / (stem + '.csv.gz')} (or {stem}.csv)")


def _digits(value: str, what: str, path: Path, i: int) -> str:
    v = value.strip()
    if v.endswith(".0"):  # tolerate ids written as floats by a spreadsheet
        v = v[:-2]
    if not v.isdigit():
        raise DataError(f"{path}: line {line_of(i)}: {what} {value!r} is not a number")
    return v


def _view_kind(view: str) -> str:
    v = _collapse(view.upper())
    if v in FRONTAL_VIEWS:
        return "frontal"
    if v in ("LL", "RL") or "LAT" in v.split() or "LATERAL" in v:
        return "lateral"
    return "other_view"


_OUTSIDE = object()  # a report whose file lies outside the root: never opened


def _read_report(root: Path, rel: str) -> object:
    """The report's text for the split file, None when it is missing, ``_OUTSIDE`` when it escapes."""
    if escapes_root(root, rel):
        return _OUTSIDE
    path = root / rel
    try:
        raw = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DataError(f"{path}: cannot read report: {e}") from e
    return report_text(raw)


def read_mimic(root: Path) -> DatasetTable:
    root = Path(root)
    split_path = _pick_csv(root, SPLIT_STEM)
    meta_path = _pick_csv(root, METADATA_STEM)
    split_df = read_csv_strings(split_path, ["dicom_id", "study_id", "subject_id", "split"])
    meta_df = read_csv_strings(meta_path, ["dicom_id", "ViewPosition"])

    views: dict[str, str] = {}
    for d, v in zip(meta_df["dicom_id"], meta_df["ViewPosition"]):
        views.setdefault(d.strip(), v)

    excluded = {"lateral": 0, "other_view": 0, "no_metadata": 0, "not_in_split": 0}
    dropped: list[tuple[str, str]] = []
    records: list[dict] = []
    reports: dict[str, object] = {}
    in_split: set[str] = set()
    cols = zip(
        split_df["dicom_id"], split_df["study_id"], split_df["subject_id"], split_df["split"]
    )
    for i, (dicom_id, study_id, subject_id, split) in enumerate(cols):
        dicom_id = dicom_id.strip()
        if not dicom_id:
            raise DataError(f"{split_path}: line {line_of(i)}: empty dicom_id")
        subject = _digits(subject_id, "subject_id", split_path, i)
        study = _digits(study_id, "study_id", split_path, i)
        official = SPLIT_MAP.get(split.strip().lower())
        if official is None:
            raise DataError(
                f"{split_path}: line {line_of(i)}: unknown split {split!r} "
                f"(expected one of {sorted(SPLIT_MAP)})"
            )
        in_split.add(dicom_id)
        patient_dir = f"files/p{subject[:2]}/p{subject}"
        image_path = f"{patient_dir}/s{study}/{dicom_id}.jpg"
        if drop_if_outside(root, image_path, dropped):
            continue
        view = views.get(dicom_id)
        if view is None:
            excluded["no_metadata"] += 1
            continue
        kind = _view_kind(view)
        if kind != "frontal":
            excluded[kind] += 1
            continue
        report_file = f"{patient_dir}/s{study}.txt"
        if report_file not in reports:
            reports[report_file] = _read_report(root, report_file)
        text = reports[report_file]
        if text is _OUTSIDE:
            dropped.append((image_path, OUTSIDE_ROOT))
            continue
        if text is None:
            dropped.append((image_path, MISSING_REPORT))
            continue
        if not text:
            dropped.append((image_path, EMPTY_REPORT))
            continue
        records.append(
            {
                "image_id": dicom_id,
                "patient_id": subject,
                "path": image_path,
                "official_split": official,
                "text": text,
            }
        )
    excluded["not_in_split"] = len(set(views) - in_split)
    return make_table(
        records,
        ["text"],
        source=str(split_path),
        dropped=dropped,
        excluded=excluded,
        sources={s: split_path for s in ("train", "valid", "test")},
    )
