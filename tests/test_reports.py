"""Tests of mflag.synth.reports against an independent reading of the produced text.

The test parses each report with its own small vocabulary (one regex per CheXpert observation), its
own negation and hedge cue lists and its own section regex, and checks the text against the truth
(the Case) and against the labels the writer returned.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from mflag.synth.reports import CHEXPERT_LABELS, Report, write_report
from mflag.synth.world import FINDING_KINDS, Case, sample_findings, sample_indication

EXAMS = ("CHEST (PA AND LAT)", "CHEST (PORTABLE AP)", "CHEST (SINGLE VIEW)", "CHEST (PA AND LAT) PORTABLE")

# --- the test's own reading vocabulary -------------------------------------------------------
CARDIAC = r"cardiomegaly|\bheart\b|\bcardiac\b"
VOCAB = {
    "Atelectasis": r"atelecta",
    "Cardiomegaly": CARDIAC,
    "Consolidation": r"consolidat",
    "Edema": r"edema",
    "Enlarged Cardiomediastinum": CARDIAC + r"|mediastin",
    "Fracture": r"fractur",
    "Lung Lesion": r"nodul|\bmass\b|lesion",
    "Lung Opacity": r"opacit|ground[- ]glass|consolidat|atelecta|edema|nodul",
    "Pleural Effusion": r"effusion",
    "Pleural Other": r"pleural thickening|fibrothorax",
    "Pneumonia": r"pneumonia",
    "Pneumothorax": r"pneumothora",
    "Support Devices": r"\btubes?\b|catheter|pacemaker|\bline\b|\bleads\b",
}
# Words that must not appear at all when an observation is blank (None).
STRICT = dict(VOCAB, **{"Lung Opacity": r"opacit|ground[- ]glass"})
KIND_VOCAB = {
    "consolidation": r"consolidat",
    "atelectasis": r"atelecta",
    "effusion": r"effusion",
    "cardiomegaly": CARDIAC,
    "edema": r"edema",
    "pneumothorax": r"pneumothora",
    "covid": r"ground[- ]glass",
    "nodule": r"nodul",
}
DEVICE_VOCAB = {
    "ett": r"endotracheal|\bET tube",
    "ngt": r"enteric|nasogastric|orogastric",
    "central_line": r"central venous|\bIJ\b|internal jugular",
    "pacemaker": r"pacemaker",
}
NEG = re.compile(r"\bno\b|\bnot\b|\bwithout\b|\bnormal\b|\bunremarkable\b|\bnegative\b|\bfree of\b", re.I)
HEDGE = re.compile(
    r"\bmay\b|\bmight\b|\bpossibl[ey]\b|cannot (be )?exclude|\blikely\b|\bcould\b|\bquestionable\b|"
    r"\bsuggestive\b|\bsuspicious\b|\bconcerning\b|\bprobabl[ey]\b|\bversus\b",
    re.I,
)
HEADER = re.compile(r"^ ([A-Z][A-Z ]*[A-Z]):", re.M)
BODY_SECTIONS = {"FINDINGS", "IMPRESSION", "CONCLUSION", "FINDINGS AND IMPRESSION"}


def sections(text: str) -> dict[str, str]:
    ms = list(HEADER.finditer(text))
    out = {}
    for i, m in enumerate(ms):
        end = ms[i + 1].start() if i + 1 < len(ms) else len(text)
        out[m.group(1)] = " ".join(text[m.end() : end].split())
    return out


def sentences(text: str) -> list[str]:
    body = " ".join(v for k, v in sections(text).items() if k in BODY_SECTIONS)
    return [s for s in re.split(r"(?<=\.)\s+", body) if s]


def mentions(sents: list[str], pattern: str) -> list[str]:
    rx = re.compile(pattern, re.I)
    return [s for s in sents if rx.search(s)]


def make_cases(n: int, seed: int) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        prev = {k: float(rng.uniform(0.2, 0.5)) for k in FINDING_KINDS}
        findings = sample_findings(rng, prev, hedge_prob=0.35)
        cases.append(
            Case(
                patient_id=f"p{i}",
                study_id=f"s{i}",
                age=int(rng.integers(20, 90)),
                sex=("M", "F")[i % 2],
                view=("PA", "AP", "LATERAL")[i % 3],
                findings=findings,
                indication=sample_indication(rng, findings),
                has_comparison=bool(rng.random() < 0.5),
                seed=i,
            )
        )
    # a few hand-made edge cases: nothing present, only a device, only a foreign object
    cases.append(Case("e0", "e0", 50, "F", "PA"))
    cases.append(Case("e1", "e1", 50, "M", "AP", findings=sample_findings(rng, {}, 0.0, forced=("device",))))
    cases.append(Case("e2", "e2", 50, "M", "PA", findings=sample_findings(rng, {}, 0.0, forced=("foreign_object",))))
    return cases


def expected_labels(case: Case) -> dict[str, float]:
    """The truth-side part of the labels: observations of present findings (spec mapping)."""
    rank = {-1.0: 1, 1.0: 2}
    exp: dict[str, float] = {}

    def put(label: str, v: float) -> None:
        if label not in exp or rank[v] > rank[exp[label]]:
            exp[label] = v

    for f in case.findings:
        v = -1.0 if f.hedged else 1.0
        k = f.kind
        if k == "consolidation":
            put("Consolidation", v)
            put("Lung Opacity", v)
            if f.infectious:
                put("Pneumonia", v)
        elif k == "atelectasis":
            put("Atelectasis", v)
            put("Lung Opacity", v)
        elif k == "effusion":
            put("Pleural Effusion", v)
        elif k == "cardiomegaly":
            put("Cardiomegaly", v)
            put("Enlarged Cardiomediastinum", v)
        elif k == "edema":
            put("Edema", v)
            put("Lung Opacity", v)
        elif k == "pneumothorax":
            put("Pneumothorax", v)
        elif k == "covid":
            put("Pneumonia", v)
            put("Lung Opacity", v)
        elif k == "nodule":
            put("Lung Lesion", v)
            put("Lung Opacity", v)
        elif k == "device":
            put("Support Devices", 1.0)
    return exp


CASES = make_cases(400, seed=7)


@pytest.fixture(scope="module")
def reports() -> list[tuple[Case, Report]]:
    rng = np.random.default_rng(11)
    out = []
    for i, case in enumerate(CASES):
        out.append((case, write_report(case, EXAMS[i % len(EXAMS)], rng, 0.2, 0.15)))
    return out


def test_label_keys_and_values(reports):
    assert CHEXPERT_LABELS == tuple(sorted(CHEXPERT_LABELS))
    assert len(CHEXPERT_LABELS) == 14
    for case, rep in reports:
        assert tuple(rep.labels) == CHEXPERT_LABELS
        assert all(v in (1.0, 0.0, -1.0, None) for v in rep.labels.values())
        assert rep.labels["Fracture"] is None and rep.labels["Pleural Other"] is None


def test_labels_match_truth(reports):
    for case, rep in reports:
        exp = expected_labels(case)
        for label in CHEXPERT_LABELS:
            if label in exp:
                assert rep.labels[label] == exp[label], (label, case.findings, rep.text)
            elif label != "No Finding":
                assert rep.labels[label] in (0.0, None), (label, case.findings, rep.text)
        abnormal = any(f.kind not in ("device", "foreign_object") for f in case.findings)
        assert rep.labels["No Finding"] == (None if abnormal else 1.0)


def test_every_present_finding_is_mentioned(reports):
    for case, rep in reports:
        sents = sentences(rep.text)
        for f in case.findings:
            if f.kind == "foreign_object":
                continue
            pat = DEVICE_VOCAB[f.subtype] if f.kind == "device" else KIND_VOCAB[f.kind]
            assert mentions(sents, pat), (f, rep.text)
            if f.kind == "consolidation" and f.infectious:
                assert mentions(sents, r"pneumonia"), rep.text


def test_labels_match_text(reports):
    for case, rep in reports:
        sents = sentences(rep.text)
        for label in CHEXPERT_LABELS:
            if label == "No Finding":
                continue
            v = rep.labels[label]
            ms = mentions(sents, VOCAB[label])
            affirmed = [s for s in ms if not NEG.search(s)]
            if v == 1.0:
                assert any(not HEDGE.search(s) for s in affirmed), (label, rep.text)
            elif v == -1.0:
                assert affirmed and all(HEDGE.search(s) for s in affirmed), (label, rep.text)
            elif v == 0.0:
                assert any(NEG.search(s) for s in ms), (label, rep.text)
                assert not affirmed, (label, rep.text)
            else:
                assert not mentions(sents, STRICT[label]), (label, rep.text)


def test_present_findings_not_in_negated_or_mixed_sentences(reports):
    for case, rep in reports:
        sents = sentences(rep.text)
        for f in case.findings:
            if f.kind in ("device", "foreign_object"):
                continue
            for s in mentions(sents, KIND_VOCAB[f.kind]):
                assert not NEG.search(s), (f, s)
                assert bool(HEDGE.search(s)) == f.hedged, (f, s)


def test_side_and_size_words(reports):
    words = {"small", "moderate", "large"}
    n_checked = 0
    for case, rep in reports:
        sents = sentences(rep.text)
        for kind, pat in (("effusion", r"effusion"), ("pneumothorax", r"pneumothora")):
            fs = case.get(kind)
            if len(fs) != 1:
                continue
            f = fs[0]
            for s in mentions(sents, pat):
                side_rx = r"\bbilateral(ly)?\b" if f.side == "bilateral" else rf"\b{f.side}\b"
                assert re.search(side_rx, s, re.I), (f, s)
                assert re.search(rf"\b{f.size}\b", s, re.I), (f, s)
                other = {"right", "left"} - {f.side}
                for w in other | (words - {f.size}):
                    assert not re.search(rf"\b{w}\b", s, re.I), (f, s)
                n_checked += 1
    assert n_checked > 50


def test_sections_and_flags(reports):
    kinds = {"combined": 0, "conclusion": 0, "no_findings": 0, "no_impression": 0}
    for case, rep in reports:
        heads = set(HEADER.findall(rep.text))
        assert {"EXAMINATION", "INDICATION", "COMPARISON"} <= heads
        assert heads <= {"EXAMINATION", "INDICATION", "COMPARISON"} | BODY_SECTIONS
        assert rep.has_findings == bool(heads & {"FINDINGS", "FINDINGS AND IMPRESSION"})
        assert rep.has_impression == bool(heads & {"IMPRESSION", "CONCLUSION", "FINDINGS AND IMPRESSION"})
        assert rep.has_impression or rep.has_findings
        secs = sections(rep.text)
        for h in heads & BODY_SECTIONS:
            assert secs[h], rep.text  # no empty body section
        assert secs["COMPARISON"] == ("___" if case.has_comparison else "None.")
        kinds["combined"] += "FINDINGS AND IMPRESSION" in heads
        kinds["conclusion"] += "CONCLUSION" in heads
        kinds["no_findings"] += not rep.has_findings
        kinds["no_impression"] += not rep.has_impression
    assert all(v > 0 for v in kinds.values()), kinds


def test_line_format(reports):
    for case, rep in reports:
        lines = rep.text.rstrip("\n").split("\n")
        assert lines[0].strip() == "FINAL REPORT"
        for ln in lines[1:]:
            assert len(ln) <= 80, ln
            assert ln.startswith(" "), ln
            assert ln == " " or not ln.startswith("  "), ln
        sex = "woman|female|F" if case.sex == "F" else "man|male|M"
        assert re.search(rf"INDICATION:  ___( year old | y/o |-year-old |)({sex})\b", rep.text), rep.text


def test_deterministic():
    for case in CASES[:50]:
        a = write_report(case, EXAMS[0], np.random.default_rng(case.seed), 0.2, 0.2)
        b = write_report(case, EXAMS[0], np.random.default_rng(case.seed), 0.2, 0.2)
        assert a == b


def test_phrasing_varies():
    case = next(c for c in CASES if len(c.findings) >= 3)
    rng = np.random.default_rng(3)
    texts = {write_report(case, EXAMS[0], rng, 0.0, 0.0).text for _ in range(20)}
    assert len(texts) >= 15


def test_never_drops_both_sections():
    rng = np.random.default_rng(5)
    for case in CASES[:100]:
        rep = write_report(case, EXAMS[1], rng, 1.0, 1.0)
        heads = set(HEADER.findall(rep.text))
        assert rep.has_impression and not rep.has_findings
        assert heads & {"IMPRESSION", "CONCLUSION"} and "FINDINGS" not in heads
        # the impression alone still carries every present finding
        sents = sentences(rep.text)
        for f in case.findings:
            if f.kind not in ("foreign_object", "device"):
                assert mentions(sents, KIND_VOCAB[f.kind]), (f, rep.text)


def test_no_sections_dropped_at_zero():
    rng = np.random.default_rng(6)
    for case in CASES[:100]:
        rep = write_report(case, EXAMS[0], rng, 0.0, 0.0)
        assert rep.has_findings and rep.has_impression


def test_foreign_objects_sometimes_mentioned():
    rng = np.random.default_rng(8)
    case = CASES[-1]
    assert case.has("foreign_object")
    said = sum(
        bool(re.search(r"coin|button|clip|wire", write_report(case, EXAMS[0], rng, 0.0, 0.0).text)) for _ in range(200)
    )
    assert 120 < said < 195
