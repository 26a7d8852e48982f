"""The embedded synthetic corpus: seven datasets written in their official on-disk layouts.

`plan_<dataset>` draws every study's ground truth (a :class:`~mflag.synth.world.Case`) in the main
process and returns the images to draw; worker processes render and write the images; then
`finish_<dataset>` writes the dataset's CSV / text files from the truth and what the renderer
measured (boxes, masks, object shapes). A truth file per dataset (`truth/<dataset>.jsonl`, beside
the dataset folders, not inside them) records the findings, and for SIIM the lung outlines, so tests
can check the labels against what was drawn.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from mflag.rle import rle_encode
from mflag.params import SyntheticParams
from mflag.synth import files
from mflag.synth.render import Rendering, Style, render
from mflag.synth.reports import CHEXPERT_LABELS, write_report
from mflag.synth.world import Case, Finding, sample_findings, sample_indication

# each dataset draws from its own stream, default_rng([seed, index]): adding one changes no other's bytes
DATASET_INDEX = {"mimic": 1, "chexpert": 2, "rsna": 3, "siim": 4, "covidx": 5, "objcxr": 6, "nih": 7}
CHEXPERT_COLUMNS = (  # the real CheXpert train.csv / valid.csv column order
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
    "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)  # fmt: skip


@dataclass
class Job:
    """One image to draw and write."""

    case: Case
    path: Path  # absolute output path
    width: int
    height: int
    style: Style
    dicom: dict | None = None  # keyword arguments of files.dicom_bytes, for .dcm outputs
    meta: dict = field(default_factory=dict)  # what finish_* needs besides the rendering


@dataclass
class Result:
    boxes: list
    ptx_mask_rles: list[str]
    objects: list
    lungs: list
    shape: tuple[int, int]


def _draw(job: Job) -> Result:
    rng = np.random.default_rng(job.case.seed)
    r: Rendering = render(job.case, job.width, job.height, job.style, rng)
    if job.dicom is not None:
        files.atomic_write_bytes(job.path, files.dicom_bytes(r.image, **job.dicom))
    else:
        files.write_image(job.path, r.image, rgba=bool(job.meta.get("rgba")))
    rles = []
    if r.ptx_mask is not None and r.ptx_mask.any():
        # some annotators drew a pneumothorax in pieces: split it into an upper and a lower row
        pieces = [r.ptx_mask]
        if job.meta.get("split_mask"):
            ys = np.nonzero(r.ptx_mask.any(axis=1))[0]
            cut = int(ys[len(ys) // 2])
            upper, lower = r.ptx_mask.copy(), r.ptx_mask.copy()
            upper[cut:], lower[:cut] = 0, 0
            pieces = [p for p in (upper, lower) if p.any()]
        rles = [rle_encode(p) for p in pieces]
    lungs = [np.round(p, 2).tolist() for p in r.lungs] if job.meta.get("keep_lungs") else []
    return Result(r.opacity_boxes, rles, r.objects, lungs, r.image.shape)


# -------------------------------------------------------------------------------------- helpers
def _style(cfg, rng: np.random.Generator, jitter: float = 0.0) -> Style:
    s = cfg.style
    j = (lambda v, a: v * (1.0 + rng.uniform(-a, a))) if jitter else (lambda v, a: v)
    return Style(
        gamma=j(s.gamma, jitter),
        contrast=j(s.contrast, jitter),
        brightness=s.brightness + (rng.uniform(-0.05, 0.05) if jitter else 0.0),
        noise=j(s.noise, jitter),
        blur=j(s.blur, jitter),
        border=s.border,
        equalize=s.equalize,
    )


def _size(cfg, rng: np.random.Generator) -> tuple[int, int]:
    s = cfg.style
    if s.size_jitter <= 0:
        return s.width, s.height
    f = 1.0 + rng.uniform(-s.size_jitter, s.size_jitter)
    return int(round(s.width * f / 2)) * 2, int(round(s.height * (f + rng.uniform(-0.05, 0.05)) / 2)) * 2


def _case(rng, cfg, pid: str, sid: str, view: str, forced: tuple[str, ...] = (), exclude=()) -> Case:
    prevalence = {k: v for k, v in cfg.prevalence.items() if k not in exclude}
    findings = sample_findings(rng, prevalence, cfg.hedge_prob, forced)
    return Case(
        patient_id=pid,
        study_id=sid,
        age=int(rng.integers(18, 91)),
        sex="M" if rng.random() < 0.5 else "F",
        view=view,
        findings=findings,
        indication=sample_indication(rng, findings),
        has_comparison=bool(rng.random() < 0.5),
        seed=int(rng.integers(2**63)),
    )


def _frontal_view(rng, cfg) -> str:
    return "AP" if rng.random() < cfg.ap_prob else "PA"


def _truth_row(job: Job, res: Result | None = None) -> dict:
    row = {
        "path": job.meta["rel"],
        "view": job.case.view,
        "findings": [[f.kind, f.side, f.zone, f.size, f.hedged, f.subtype] for f in job.case.findings],
    }
    if res is not None and res.lungs:
        row["lungs"] = res.lungs
    row.update(job.meta.get("truth", {}))  # what a dataset's labels need beyond the findings (nih: infectious)
    return row


def _write_truth(out: Path, dataset: str, jobs: list[Job], results: list[Result]) -> None:
    lines = [json.dumps(_truth_row(j, r), separators=(",", ":")) for j, r in zip(jobs, results)]
    files.atomic_write_bytes(out / "truth" / f"{dataset}.jsonl", ("\n".join(lines) + "\n").encode())


def _frac_hash(*parts) -> float:
    return int(files.stable_hex(*parts, n=16), 16) / 16**16


# ---------------------------------------------------------------------------------------- MIMIC
def plan_mimic(cfg, seed: int, root: Path) -> tuple[list[Job], dict]:
    rng = np.random.default_rng([seed, DATASET_INDEX["mimic"]])
    jobs, studies = [], []
    for i in range(cfg.patients):
        subject = 10000000 + (7907 * i) % 9999991  # 8-digit ids 1xxxxxxx, unique (prime modulus)
        u = _frac_hash(seed, "mimic-split", subject)
        split = "test" if u < cfg.test_patients else ("validate" if u < cfg.test_patients + cfg.valid_patients else "train")
        for s in range(int(rng.integers(1, cfg.max_studies + 1))):
            study = 50000000 + (7919 * (i * cfg.max_studies + s)) % 9999991  # 5xxxxxxx, unique
            view = _frontal_view(rng, cfg)
            case = _case(rng, cfg, str(subject), str(study), view)
            lateral = rng.random() < cfg.lateral_prob
            exam = "CHEST (PA AND LAT)" if lateral and view == "PA" else ("CHEST (PORTABLE AP)" if view == "AP" else "CHEST (PA)")
            report = write_report(case, exam, rng, cfg.p_no_findings, cfg.p_no_impression)
            folder = f"files/p{str(subject)[:2]}/p{subject}"
            studies.append((case, report, f"{folder}/s{study}.txt"))
            views = [view] + (["LATERAL"] if lateral else [])
            for k, v in enumerate(views):
                dicom_id = "-".join(files.stable_hex(seed, subject, study, k, n=40)[j : j + 8] for j in range(0, 40, 8))
                rel = f"{folder}/s{study}/{dicom_id}.jpg"
                w, h = _size(cfg, rng)
                c = case.with_view(v, int(rng.integers(2**63)))
                jobs.append(Job(c, root / rel, w, h, _style(cfg, rng, 0.1), meta=dict(rel=rel, dicom_id=dicom_id, split=split)))
    return jobs, {"studies": studies}


def finish_mimic(cfg, root: Path, jobs: list[Job], results: list[Result], extra: dict) -> None:
    for case, report, rel in extra["studies"]:
        files.atomic_write_bytes(root / rel, report.text.encode())
    split_rows, meta_rows = [], []
    for j, r in zip(jobs, results):
        c = j.case
        split_rows.append([j.meta["dicom_id"], c.study_id, c.patient_id, j.meta["split"]])
        orientation = "Erect" if c.view != "AP" else "Recumbent"
        view_name = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}[c.view]
        meta_rows.append([
            j.meta["dicom_id"], c.patient_id, c.study_id, "CHEST (PA AND LAT)" if c.view != "AP" else "CHEST (PORTABLE AP)",
            c.view, r.shape[0], r.shape[1], 21000000 + int(c.study_id) % 1000000, "000000.000",
            "CHEST (PA AND LAT)", view_name, orientation,
        ])  # fmt: skip
    files.atomic_write_bytes(
        root / "mimic-cxr-2.0.0-split.csv.gz",
        files.gzip_bytes(files.csv_bytes(["dicom_id", "study_id", "subject_id", "split"], split_rows)),
    )
    meta_header = [
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
        "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning",
    ]  # fmt: skip
    files.atomic_write_bytes(root / "mimic-cxr-2.0.0-metadata.csv.gz", files.gzip_bytes(files.csv_bytes(meta_header, meta_rows)))
    chex_rows = [
        [case.patient_id, case.study_id] + [files.fmt_label(report.labels[k]) for k in CHEXPERT_LABELS]
        for case, report, _ in extra["studies"]
    ]
    files.atomic_write_bytes(
        root / "mimic-cxr-2.0.0-chexpert.csv.gz",
        files.gzip_bytes(files.csv_bytes(["subject_id", "study_id", *CHEXPERT_LABELS], chex_rows)),
    )


# ------------------------------------------------------------------------------------- CheXpert
def plan_chexpert(cfg, seed: int, root: Path) -> tuple[list[Job], dict]:
    rng = np.random.default_rng([seed, DATASET_INDEX["chexpert"]])
    base = root / "CheXpert-v1.0-small"
    jobs = []
    for i in range(cfg.train_patients + cfg.valid_patients):
        valid = i >= cfg.train_patients
        part = "valid" if valid else "train"
        pid = f"patient{i + 1:05d}"
        for s in range(1 if valid else int(rng.integers(1, cfg.max_studies + 1))):
            view = _frontal_view(rng, cfg)
            case = _case(rng, cfg, pid, f"study{s + 1}", view)
            # the labels come from the report, as CheXpert's labeler read it (valid.csv: consensus of the truth)
            report = write_report(case, "CHEST", rng, 0.0, 0.0)
            views = [view] + (["LATERAL"] if rng.random() < cfg.lateral_prob else [])
            for k, v in enumerate(views):
                name = f"view{k + 1}_{'lateral' if v == 'LATERAL' else 'frontal'}.jpg"
                rel = f"CheXpert-v1.0-small/{part}/{pid}/study{s + 1}/{name}"
                w, h = _size(cfg, rng)
                c = case.with_view(v, int(rng.integers(2**63)))
                jobs.append(Job(c, root / rel, w, h, _style(cfg, rng, 0.1), meta=dict(rel=rel, part=part, labels=report.labels)))
    del base
    return jobs, {}


def _chexpert_value(job: Job, label: str) -> str:
    if job.meta["part"] == "valid":  # valid.csv: radiologist consensus, 0/1 with no blanks
        v = job.meta["labels"].get(label)
        truth = {
            "No Finding": not any(f.kind not in ("device", "foreign_object") for f in job.case.findings),
        }.get(label)
        if truth is None:
            return "1.0" if v in (1.0, -1.0) else "0.0"
        return "1.0" if truth else "0.0"
    return files.fmt_label(job.meta["labels"].get(label))


def finish_chexpert(cfg, root: Path, jobs: list[Job], results: list[Result], extra: dict) -> None:
    for part in ("train", "valid"):
        rows = []
        for j in jobs:
            if j.meta["part"] != part:
                continue
            c = j.case
            frontal = c.view != "LATERAL"
            rows.append(
                [j.meta["rel"], "Male" if c.sex == "M" else "Female", c.age, "Frontal" if frontal else "Lateral", c.view if frontal else ""]
                + [_chexpert_value(j, k) for k in CHEXPERT_COLUMNS[5:]]
            )
        files.atomic_write_bytes(root / "CheXpert-v1.0-small" / f"{part}.csv", files.csv_bytes(list(CHEXPERT_COLUMNS), rows))


# ----------------------------------------------------------------------------------------- RSNA
def _uuid(*parts) -> str:
    h = files.stable_hex(*parts, n=32)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def plan_rsna(cfg, seed: int, root: Path) -> tuple[list[Job], dict]:
    rng = np.random.default_rng([seed, DATASET_INDEX["rsna"]])
    jobs = []
    for i in range(cfg.patients):
        pid = _uuid(seed, "rsna", i)
        view = _frontal_view(rng, cfg)
        case = _case(rng, cfg, pid, pid, view, exclude=("foreign_object",))
        rel = f"stage_2_train_images/{pid}.dcm"
        dicom = dict(
            patient_id=pid, sex=case.sex, age=case.age, view=view,
            study_uid=files.stable_uid(seed, "rsna-study", i), series_uid=files.stable_uid(seed, "rsna-series", i),
            sop_uid=files.stable_uid(seed, "rsna-sop", i), encoding="jpeg",
        )  # fmt: skip
        w, h = _size(cfg, rng)
        jobs.append(Job(case, root / rel, w, h, _style(cfg, rng, 0.08), dicom=dicom, meta=dict(rel=rel)))
    return jobs, {}


def finish_rsna(cfg, root: Path, jobs: list[Job], results: list[Result], extra: dict) -> None:
    label_rows, class_rows = [], []
    for j, r in zip(jobs, results):
        pid = j.case.patient_id
        if r.boxes:
            for x1, y1, x2, y2 in r.boxes:
                label_rows.append([pid, f"{x1:.1f}", f"{y1:.1f}", f"{x2 - x1:.1f}", f"{y2 - y1:.1f}", 1])
                class_rows.append([pid, "Lung Opacity"])
        else:
            label_rows.append([pid, "", "", "", "", 0])
            abnormal = any(f.kind != "device" for f in j.case.findings)
            class_rows.append([pid, "No Lung Opacity / Not Normal" if abnormal else "Normal"])
    files.atomic_write_bytes(
        root / "stage_2_train_labels.csv", files.csv_bytes(["patientId", "x", "y", "width", "height", "Target"], label_rows)
    )
    files.atomic_write_bytes(root / "stage_2_detailed_class_info.csv", files.csv_bytes(["patientId", "class"], class_rows))


# ----------------------------------------------------------------------------------------- SIIM
def plan_siim(cfg, seed: int, root: Path) -> tuple[list[Job], dict]:
    rng = np.random.default_rng([seed, DATASET_INDEX["siim"]])
    jobs, i, patient = [], 0, 0
    while i < cfg.images:
        pid = _uuid(seed, "siim-patient", patient)
        for _ in range(1 if rng.random() < 0.9 else 2):  # some patients have two films
            if i >= cfg.images:
                break
            image_id = f"{files.UID_ROOT}.4.8323329.{1000 + i}.{1517875000 + int(rng.integers(1000))}.{int(rng.integers(10**6))}"
            study, series = files.stable_uid(seed, "siim-study", i), files.stable_uid(seed, "siim-series", i)
            view = _frontal_view(rng, cfg)
            case = _case(rng, cfg, pid, study, view, exclude=("foreign_object",))
            encoding = "raw16" if rng.random() < cfg.sixteen_bit_prob else "jpeg"
            dicom = dict(
                patient_id=pid, sex=case.sex, age=case.age, view=view, study_uid=study, series_uid=series,
                sop_uid=image_id, encoding=encoding, monochrome1=bool(rng.random() < cfg.monochrome1_prob),
            )  # fmt: skip
            rel = f"dicom-images-train/{study}/{series}/{image_id}.dcm"
            w, h = _size(cfg, rng)
            # large pneumothoraces, and a quarter of the rest, were annotated in two pieces (two CSV rows)
            split_mask = bool(rng.random() < 0.25) or any(f.size == "large" for f in case.get("pneumothorax"))
            meta = dict(rel=rel, image_id=image_id, keep_lungs=True, split_mask=split_mask)
            jobs.append(Job(case, root / rel, w, h, _style(cfg, rng, 0.08), dicom=dicom, meta=meta))
            i += 1
        patient += 1
    return jobs, {}


def finish_siim(cfg, root: Path, jobs: list[Job], results: list[Result], extra: dict) -> None:
    lines = ["ImageId, EncodedPixels"]  # the real file's header, leading space included
    for j, r in zip(jobs, results):
        for rle in r.ptx_mask_rles or ["-1"]:
            lines.append(f"{j.meta['image_id']}, {rle}")
    files.atomic_write_bytes(root / "train-rle.csv", ("\n".join(lines) + "\n").encode())


# --------------------------------------------------------------------------------------- COVIDx
COVIDX_SOURCES = {  # source -> (file format, style tweak): the list mixes many public collections
    "cohen": ("jpg", 0.15),
    "actmed": ("png", 0.1),
    "sirm": ("png", 0.2),
    "ricord": ("jpg", 0.1),
    "rsna": ("png", 0.05),
    "stonybrook": ("jpg", 0.15),
    "bimcv": ("png", 0.2),
}
COVIDX_CLASSES = ("normal", "pneumonia", "COVID-19")


def plan_covidx(cfg, seed: int, root: Path) -> tuple[list[Job], dict]:
    rng = np.random.default_rng([seed, DATASET_INDEX["covidx"]])
    mix = np.array([cfg.class_mix[c] for c in COVIDX_CLASSES], dtype=np.float64)
    jobs = []
    sources = list(COVIDX_SOURCES)
    for part, n in (("train", cfg.train_images), ("test", cfg.test_images)):
        i = 0
        while i < n:
            label = COVIDX_CLASSES[int(rng.choice(3, p=mix / mix.sum()))]
            source = sources[int(rng.integers(len(sources)))]
            ext, jitter = COVIDX_SOURCES[source]
            pid = f"{source}-{part}-{i}"
            forced = {"normal": (), "pneumonia": ("consolidation",), "COVID-19": ("covid",)}[label]
            exclude = ("consolidation", "covid", "effusion", "edema", "pneumothorax") if label == "normal" else ("consolidation", "covid")
            films = 1 if label != "COVID-19" or rng.random() < 0.7 else 2  # serial films of COVID patients
            for k in range(min(films, n - i)):
                case = _case(rng, cfg, pid, f"{pid}-{k}", _frontal_view(rng, cfg), forced=forced, exclude=exclude)
                fname = f"{files.stable_hex(seed, part, i, n=12)}.{ext}"
                rel = f"{part}/{fname}"
                w, h = _size(cfg, rng)
                meta = dict(rel=rel, fname=fname, label=label, source=source, part=part)
                jobs.append(Job(case, root / rel, w, h, _style(cfg, rng, jitter), meta=meta))
                i += 1
    return jobs, {}


def finish_covidx(cfg, root: Path, jobs: list[Job], results: list[Result], extra: dict) -> None:
    for part in ("train", "test"):
        lines = [
            f"{j.case.patient_id} {j.meta['fname']} {j.meta['label']} {j.meta['source']}" for j in jobs if j.meta["part"] == part
        ]
        files.atomic_write_bytes(root / f"{part}_COVIDx9A.txt", ("\n".join(lines) + "\n").encode())


# ----------------------------------------------------------------------------------- Object-CXR
def plan_objcxr(cfg, seed: int, root: Path) -> tuple[list[Job], dict]:
    rng = np.random.default_rng([seed, DATASET_INDEX["objcxr"]])
    jobs = []
    k = 0
    for part, n in (("train", cfg.train_images), ("dev", cfg.dev_images)):
        for _ in range(n):
            k += 1
            name = f"{k:05d}.jpg"
            case = _case(rng, cfg, name, name, _frontal_view(rng, cfg))
            rel = f"{part}/{name}"
            w, h = _size(cfg, rng)
            jobs.append(Job(case, root / rel, w, h, _style(cfg, rng, 0.1), meta=dict(rel=rel, name=name, part=part)))
    return jobs, {}


def _annotation(objects: list) -> str:
    out = []
    for kind, coords in objects:
        out.append(" ".join([str(kind)] + [str(int(round(v))) for v in coords]))
    return ";".join(out)


def finish_objcxr(cfg, root: Path, jobs: list[Job], results: list[Result], extra: dict) -> None:
    for part in ("train", "dev"):
        rows = [[j.meta["name"], _annotation(r.objects)] for j, r in zip(jobs, results) if j.meta["part"] == part]
        files.atomic_write_bytes(root / f"{part}.csv", files.csv_bytes(["image_name", "annotation"], rows))


# ------------------------------------------------------------------------------ NIH ChestX-ray14
NIH_LABELS = (  # the 14 labels, in the order of the NIH paper (and of mflag.data.nih.LABELS)
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
NIH_HEADER = [  # Data_Entry_2017.csv as released: the bracketed names split at their commas, a trailing comma
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position",
    "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", "",
]  # fmt: skip
NIH_BBOX_HEADER = ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""]  # BBox_List_2017.csv
NIH_FOLDER_IMAGES = 1000  # images per images_NNN/images/ folder, in Image Index order (real: 10,000)


def nih_labels(findings) -> list[str]:
    """The NIH labels of a study's findings (``Finding`` objects), in NIH_LABELS order.

    consolidation -> Consolidation, and Pneumonia where it is infectious; covid -> Pneumonia; atelectasis,
    effusion, cardiomegaly, edema, pneumothorax -> the label of that name; nodule -> Nodule (small or moderate:
    under 3 cm) or Mass (large; the world draws no large nodule, so Mass stays 0). Support devices and foreign
    objects have no NIH label. Infiltration, Emphysema, Fibrosis, Pleural_Thickening and Hernia are findings the
    world cannot draw: 0 in every synthetic image (the macro AUC skips a label with one class in test).
    Hedged findings count: the labels are the truth, not a report's reading of it.
    """
    out = set()
    for f in findings:
        if f.kind == "consolidation":
            out |= {"Consolidation", "Pneumonia"} if f.infectious else {"Consolidation"}
        elif f.kind == "covid":
            out.add("Pneumonia")
        elif f.kind == "effusion":
            out.add("Effusion")
        elif f.kind in ("atelectasis", "cardiomegaly", "edema", "pneumothorax"):
            out.add(f.kind.capitalize())
        elif f.kind == "nodule":
            out.add("Mass" if f.size == "large" else "Nodule")
    return [k for k in NIH_LABELS if k in out]


def plan_nih(cfg, seed: int, root: Path) -> tuple[list[Job], dict]:
    """Patients 1, 2, ... with 1..max_followups images each (``<patient:08d>_<follow-up:03d>.png``); the first
    patients fill train_val_list.txt, the next ones test_list.txt (patient-disjoint, as the official lists)."""
    rng = np.random.default_rng([seed, DATASET_INDEX["nih"]])
    jobs, patient, k_image = [], 0, 0
    for part, n in (("train_val", cfg.train_val_images), ("test", cfg.test_images)):
        i = 0
        while i < n:
            patient += 1
            first: Case | None = None
            for followup in range(min(int(rng.integers(1, cfg.max_followups + 1)), n - i)):
                name = f"{patient:08d}_{followup:03d}.png"
                case = _case(rng, cfg, str(patient), name, _frontal_view(rng, cfg), exclude=("foreign_object",))
                if first is None:
                    first = case
                else:  # one patient: the same sex and age on every follow-up (NIH ages are per image; close enough)
                    case = dataclasses.replace(case, sex=first.sex, age=first.age)
                rel = f"images_{k_image // NIH_FOLDER_IMAGES + 1:03d}/images/{name}"
                w, h = _size(cfg, rng)
                original = [int(v) for v in rng.integers(2000, 3057, size=2)]  # width, height before NIH's resize
                spacing = (0.139, 0.143, 0.168)[int(rng.integers(3))]
                meta = dict(rel=rel, name=name, part=part, followup=followup, original=original, spacing=spacing,
                            rgba=bool(rng.random() < cfg.rgba_prob),
                            truth={"infectious": [f.infectious for f in case.findings]})  # fmt: skip
                jobs.append(Job(case, root / rel, w, h, _style(cfg, rng, 0.1), meta=meta))
                i += 1
                k_image += 1
    return jobs, {}


def finish_nih(cfg, root: Path, jobs: list[Job], results: list[Result], extra: dict) -> None:
    rows, boxes = [], []
    for j, r in zip(jobs, results):
        c, labels = j.case, nih_labels(j.case.findings)
        rows.append([
            j.meta["name"], "|".join(sorted(labels)) or "No Finding", j.meta["followup"], c.patient_id, c.age, c.sex,
            c.view, *j.meta["original"], j.meta["spacing"], j.meta["spacing"], "",
        ])  # fmt: skip
        if j.meta["part"] == "test" and "Pneumonia" in labels:  # the real boxes are on test images
            for x1, y1, x2, y2 in r.boxes:
                xywh = (f"{v:.6f}" for v in (x1, y1, x2 - x1, y2 - y1))
                boxes.append([j.meta["name"], "Pneumonia", *xywh, "", "", ""])  # three trailing empties, as released
    files.atomic_write_bytes(root / "Data_Entry_2017.csv", files.csv_bytes(NIH_HEADER, rows))
    for part, list_name in (("train_val", "train_val_list.txt"), ("test", "test_list.txt")):
        names = [j.meta["name"] for j in jobs if j.meta["part"] == part]
        files.atomic_write_bytes(root / list_name, ("\n".join(names) + "\n").encode())
    files.atomic_write_bytes(root / "BBox_List_2017.csv", files.csv_bytes(NIH_BBOX_HEADER, boxes))


# -------------------------------------------------------------------------------------- driver
PLANS: dict[str, tuple[Callable, Callable]] = {
    "mimic": (plan_mimic, finish_mimic),
    "chexpert": (plan_chexpert, finish_chexpert),
    "rsna": (plan_rsna, finish_rsna),
    "siim": (plan_siim, finish_siim),
    "covidx": (plan_covidx, finish_covidx),
    "objcxr": (plan_objcxr, finish_objcxr),
    "nih": (plan_nih, finish_nih),
}


def generate(params: SyntheticParams, out_dir: Path, datasets: tuple[str, ...] = tuple(PLANS), progress: bool = True) -> dict:
    """Write the corpus under `out_dir/<dataset>/` (each replaced whole) and `out_dir/truth/`.

    Returns per-dataset image counts. Deterministic: the same params give byte-identical files.
    """
    out_dir = Path(out_dir)
    plans = {}
    for name in datasets:
        cfg = getattr(params, name)
        tmp_root = out_dir / f".{name}.partial"
        if tmp_root.exists():
            shutil.rmtree(tmp_root)
        jobs, extra = PLANS[name][0](cfg, params.seed, tmp_root)
        # one world: the lesions' and objects' sizes are the same in every dataset (only the scanner differs)
        world = {"pneumonia_scale": params.pneumonia_scale, "object_scale": params.object_scale}
        jobs = [dataclasses.replace(j, style=dataclasses.replace(j.style, **world)) for j in jobs]
        plans[name] = (cfg, tmp_root, jobs, extra)
    all_jobs = [job for _, _, jobs, _ in plans.values() for job in jobs]
    ctx = mp.get_context("fork" if os.name == "posix" else "spawn")
    bar = tqdm(total=len(all_jobs), desc="synthesize", unit="img", disable=not progress)
    results: list[Result] = []
    if params.workers > 1:
        with ctx.Pool(params.workers) as pool:
            for res in pool.imap(_draw, all_jobs, chunksize=16):
                results.append(res)
                bar.update()
    else:
        for job in all_jobs:
            results.append(_draw(job))
            bar.update()
    bar.close()
    counts, start = {}, 0
    for name, (cfg, tmp_root, jobs, extra) in plans.items():
        res = results[start : start + len(jobs)]
        start += len(jobs)
        PLANS[name][1](cfg, tmp_root, jobs, res, extra)
        _write_truth(out_dir, name, jobs, res)
        final = out_dir / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp_root, final)
        counts[name] = len(jobs)
    return counts
