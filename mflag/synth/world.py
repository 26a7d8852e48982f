"""The ground truth of the synthetic world: what a study shows, before it is drawn or written.

A :class:`Case` is one imaging study of one patient: who the patient is, the view, and the list of
:class:`Finding` objects that are present. The renderer draws a case, the report writer describes it,
and each dataset's labels are derived from it, so image, text and labels always agree.

Image convention: the patient's right is on the image's left (radiological convention). ``side`` is
always the patient's side.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

# Every kind of finding the world knows, with the words a report may use for it.
FINDING_KINDS = (
    "consolidation",  # patchy air-space opacity; `infectious` makes the report call it pneumonia
    "atelectasis",  # plate-like / basal volume loss
    "effusion",  # basal opacity with a meniscus, blunted costophrenic angle
    "cardiomegaly",  # enlarged cardiac silhouette
    "edema",  # bilateral perihilar haze
    "pneumothorax",  # lucent rim without lung markings, visceral pleural line
    "covid",  # bilateral peripheral ground glass
    "nodule",  # small round opacity
    "device",  # support device: tube, line, pacemaker
    "foreign_object",  # coin, button, clip, wire (Object-CXR)
)
SIDES = ("right", "left", "bilateral")
SIZES = ("small", "moderate", "large")
ZONES = ("upper", "middle", "lower")
DEVICE_TYPES = ("ett", "ngt", "central_line", "pacemaker")
OBJECT_TYPES = ("coin", "button", "clip", "wire")


@dataclass(frozen=True)
class Finding:
    kind: str
    side: str = "bilateral"  # patient side: right | left | bilateral
    zone: str = "lower"  # upper | middle | lower (craniocaudal position inside the lung)
    size: str = "moderate"  # small | moderate | large
    hedged: bool = False  # the radiologist is uncertain: the report hedges, CheXpert label -1
    infectious: bool = False  # consolidation read as pneumonia
    subtype: str = ""  # device or foreign-object type
    count: int = 1  # number of nodules / objects / patches


@dataclass(frozen=True)
class Case:
    patient_id: str
    study_id: str
    age: int
    sex: str  # "M" | "F"
    view: str  # "PA" | "AP" | "LATERAL"
    findings: tuple[Finding, ...] = ()
    indication: str = ""
    has_comparison: bool = False
    seed: int = 0  # seed of everything random about this one image (rendering, phrasing)
    extra: dict = field(default_factory=dict, compare=False)

    def has(self, kind: str) -> bool:
        return any(f.kind == kind for f in self.findings)

    def get(self, kind: str) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.kind == kind)

    def with_view(self, view: str, seed: int) -> "Case":
        return replace(self, view=view, seed=seed)


def _choice(rng: np.random.Generator, options, p=None):
    return options[int(rng.choice(len(options), p=p))]


def sample_finding(rng: np.random.Generator, kind: str, hedge_prob: float) -> Finding:
    """Draw the attributes of one present finding of `kind`."""
    size = _choice(rng, SIZES, p=[0.45, 0.35, 0.2])
    side = _choice(rng, SIDES, p=[0.4, 0.35, 0.25])
    zone = _choice(rng, ZONES, p=[0.2, 0.3, 0.5])
    # Only subtle findings get hedged: a large effusion is not "possible".
    hedged = bool(size != "large" and rng.random() < hedge_prob)
    kw: dict = {}
    if kind == "consolidation":
        kw = dict(infectious=bool(rng.random() < 0.7), count=int(rng.integers(1, 3)))
    elif kind == "atelectasis":
        zone = "lower"
    elif kind == "effusion":
        zone = "lower"
    elif kind in ("cardiomegaly", "edema", "covid"):
        side, zone = "bilateral", ("middle" if kind != "covid" else "lower")
    elif kind == "pneumothorax":
        side = _choice(rng, ("right", "left"))
        zone = "upper"
    elif kind == "nodule":
        size = _choice(rng, ("small", "moderate"))
        kw = dict(count=int(rng.integers(1, 3)))
    elif kind == "device":
        kw = dict(subtype=_choice(rng, DEVICE_TYPES, p=[0.3, 0.25, 0.3, 0.15]))
        hedged, side, zone = False, "bilateral", "middle"
    elif kind == "foreign_object":
        kw = dict(subtype=_choice(rng, OBJECT_TYPES), count=int(rng.integers(1, 4)))
        hedged = False
    if kind in ("consolidation", "atelectasis", "effusion") and side == "bilateral" and size == "large":
        size = "moderate"  # keep bilateral large opacities rare enough to leave lung visible
    return Finding(kind=kind, side=side, zone=zone, size=size, hedged=hedged, **kw)


def sample_findings(
    rng: np.random.Generator, prevalence: dict[str, float], hedge_prob: float, forced: tuple[str, ...] = ()
) -> tuple[Finding, ...]:
    """Independent draws per kind (plus `forced` kinds), in the fixed order of FINDING_KINDS."""
    present = [k for k in FINDING_KINDS if k in forced or rng.random() < prevalence.get(k, 0.0)]
    return tuple(sample_finding(rng, k, hedge_prob) for k in present)


INDICATIONS = {
    "consolidation": ("fever and cough", "productive cough", "shortness of breath, fever", "r/o pneumonia"),
    "effusion": ("dyspnea", "evaluate for effusion", "decreased breath sounds at the base"),
    "pneumothorax": ("chest pain", "s/p line placement, eval for pneumothorax", "sudden dyspnea"),
    "edema": ("chf exacerbation", "volume overload", "worsening dyspnea, eval for edema"),
    "cardiomegaly": ("chf", "hypertension, dyspnea"),
    "device": ("line placement", "s/p intubation, eval tube position", "check ng tube placement"),
    "covid": ("fever, hypoxia, covid positive", "eval for viral pneumonia"),
}
GENERIC_INDICATIONS = ("chest pain", "cough", "preop evaluation", "shortness of breath", "eval for infiltrate")


def sample_indication(rng: np.random.Generator, findings: tuple[Finding, ...]) -> str:
    kinds = [f.kind for f in findings if f.kind in INDICATIONS]
    if kinds and rng.random() < 0.7:
        return _choice(rng, INDICATIONS[_choice(rng, kinds)])
    return _choice(rng, GENERIC_INDICATIONS)
