"""Free-text radiology reports for synthetic cases, in the style of MIMIC-CXR, with CheXpert labels.

:func:`write_report` turns one :class:`~mflag.synth.world.Case` into the text of a MIMIC-CXR style
report file (``FINAL REPORT`` header, EXAMINATION / INDICATION / COMPARISON / FINDINGS / IMPRESSION
sections, lines wrapped at 78 characters and indented by one space) and into the 14 CheXpert labeler
observations for that text.

How the text and the labels are kept in agreement:

* every sentence is produced together with the labels it asserts (1.0 positive, -1.0 uncertain,
  0.0 negated); the report's labels are the merge of the labels of the sentences that end up in it
  (1 beats -1 beats 0 beats blank), so a negation in the text always gives 0.0 and a 0.0 always
  comes from a negation in the text;
* every present finding (foreign objects excepted, which are mentioned in about 80 % of reports) is
  described in every section that is written out (findings, and impression when there is no
  findings section), so dropping a section never loses a finding;
* a hedged finding is only ever written in a sentence holding a hedge word (may, possible,
  cannot exclude, likely, could, questionable, suggestive, suspicious); a non-hedged one only in a
  sentence with neither a hedge nor a negation word; one finding per sentence, negations in their
  own sentences;
* side and size words are the finding's own (``side``, ``size``); for the heart and for edema the
  size is spoken as severity (small -> mild, moderate -> moderate, large -> severe/marked); nodules
  by diameter in mm (small 5-8 mm, moderate 10-20 mm, large 22-28 mm).

Vocabulary is chosen so that a CheXpert-style reader sees no extra observation: no bare 'line'
outside support devices, no 'opacity' in negations, no 'fracture', 'mass', 'congestion',
'pleural thickening'; foreign objects avoid device words (tube, catheter, line, device, marker).

All randomness comes from the ``rng`` argument, drawn in blocks of uniforms, so a report costs a
handful of numpy calls and the same case with the same generator state gives the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .world import Case, Finding

CHEXPERT_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)

HEADER_LINE = " " * 33 + "FINAL REPORT"
_WIDTH = 79  # longest line, leading space included
_P_COMBINED = 0.10  # two-section reports written as one FINDINGS AND IMPRESSION section
_P_CONCLUSION = 0.05  # impression titled CONCLUSION
_P_MENTION_OBJECT = 0.8  # foreign objects are mentioned in this share of reports


@dataclass(frozen=True)
class Report:
    text: str  # the full free-text report file content
    labels: dict[str, float | None]  # CHEXPERT_LABELS -> 1.0 / 0.0 / -1.0 / None (blank)
    has_findings: bool  # the report has a findings-type section
    has_impression: bool  # the report has an impression-type section


# --------------------------------------------------------------------------------------------
# randomness


class _Draw:
    """Uniforms drawn from the caller's generator in blocks (numpy calls are the slow part)."""

    __slots__ = ("rng", "buf", "i")

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.buf = rng.random(64).tolist()
        self.i = 0

    def u(self) -> float:
        if self.i >= len(self.buf):
            self.buf = self.rng.random(64).tolist()
            self.i = 0
        v = self.buf[self.i]
        self.i += 1
        return v

    def chance(self, p: float) -> bool:
        return self.u() < p

    def pick(self, seq):
        return seq[min(int(self.u() * len(seq)), len(seq) - 1)]

    def integer(self, lo: int, hi: int) -> int:  # inclusive
        return lo + min(int(self.u() * (hi - lo + 1)), hi - lo)

    def shuffle(self, lst: list) -> None:
        for j in range(len(lst) - 1, 0, -1):
            k = min(int(self.u() * (j + 1)), j)
            lst[j], lst[k] = lst[k], lst[j]


# --------------------------------------------------------------------------------------------
# labels

_RANK = {None: 0, 0.0: 1, -1.0: 2, 1.0: 3}


def _merge(into: dict, labels: dict) -> None:
    for k, v in labels.items():
        if _RANK[v] > _RANK[into.get(k)]:
            into[k] = v


# --------------------------------------------------------------------------------------------
# small language helpers

_NUM = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
_SEVERITY = {
    "small": (("mild", "mildly"),),
    "moderate": (("moderate", "moderately"),),
    "large": (("severe", "severely"), ("marked", "markedly")),
}
_EXTENT = {"small": ("mild", "scattered"), "moderate": ("moderate",), "large": ("extensive", "diffuse")}
_ZONE_WORD = {"upper": "upper", "middle": "mid", "lower": "lower"}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _num(n: int) -> str:
    return _NUM.get(n, str(n))


def _article_mm(mm: int) -> str:
    return "an" if mm in (8, 11, 18) or 80 <= mm < 90 else "a"


def _loc_adj(d: _Draw, side: str, zone: str) -> str:
    """Attributive location: 'right lower lobe', 'left basilar', 'bibasilar'."""
    if side == "bilateral":
        if zone == "upper":
            return d.pick(("bilateral upper lobe", "bilateral upper zone"))
        if zone == "middle":
            return d.pick(("bilateral mid lung", "bilateral mid zone"))
        return d.pick(("bibasilar", "bilateral lower lobe", "bilateral basilar"))
    if zone == "upper":
        return d.pick((f"{side} upper lobe", f"{side} upper zone"))
    if zone == "middle":
        return (
            d.pick(("right middle lobe", "right mid lung"))
            if side == "right"
            else d.pick(("left mid lung", "left mid zone"))
        )
    return d.pick((f"{side} lower lobe", f"{side} basilar", f"{side} lower zone"))


def _loc_pp(d: _Draw, side: str, zone: str) -> str:
    """Prepositional location: 'in the right lower lobe', 'at both lung bases'."""
    if side == "bilateral":
        if zone == "upper":
            return d.pick(("in both upper lobes", "in the upper lobes bilaterally"))
        if zone == "middle":
            return d.pick(("in both mid lungs", "in the mid lungs bilaterally"))
        return d.pick(("at both lung bases", "in both lower lobes", "at the lung bases bilaterally"))
    if zone == "upper":
        return d.pick((f"in the {side} upper lobe", f"in the {side} upper zone", f"in the {side} upper lung"))
    if zone == "middle":
        if side == "right":
            return d.pick(("in the right middle lobe", "in the right mid lung"))
        return d.pick(("in the left mid lung", "in the left mid lung zone"))
    return d.pick((f"in the {side} lower lobe", f"at the {side} lung base", f"at the {side} base"))


# --------------------------------------------------------------------------------------------
# one sentence (without the final period) per finding; mode "F" findings, "I" impression.
# Each function returns (text, labels).

_PNEU_POS = (
    ", consistent with pneumonia",
    ", compatible with pneumonia",
    ", in keeping with pneumonia",
    ", consistent with pneumonia in the appropriate clinical setting",
)
_PNEU_HEDGE = (
    ", which may represent early pneumonia",
    ", possibly early pneumonia",
    ", suspicious for early pneumonia",
    ", which could reflect pneumonia",
)


def _consolidation(d: _Draw, f: Finding, x: dict, mode: str, full: bool, pneu: bool):
    v = -1.0 if f.hedged else 1.0
    size = f.size
    infectious = f.infectious
    if mode == "F":
        pp = _loc_pp(d, f.side, f.zone)
        if f.count <= 1:
            np_, be = d.pick(
                (
                    (f"a {size} focal consolidation", "is"),
                    (f"a {size} area of consolidation", "is"),
                    (f"{size} airspace consolidation", "is"),
                )
            )
        else:
            np_, be = d.pick(
                (
                    (f"{_num(f.count)} {size} areas of consolidation", "are"),
                    (f"{size} multifocal consolidation", "is"),
                    (f"{size} patchy consolidation", "is"),
                )
            )
        if f.hedged:
            bare = f"{size} focal consolidation" if f.count <= 1 else f"{size} multifocal consolidation"
            s = d.pick(
                (
                    f"possible {bare} {pp}",
                    f"{np_} {pp} cannot be excluded",
                    f"questionable {bare} {pp}",
                    f"findings are suggestive of {np_} {pp}",
                )
            )
        else:
            s = d.pick((f"there {be} {np_} {pp}", f"{np_} {be} seen {pp}", f"{np_} {be} present {pp}", f"{np_} {pp}"))
        if infectious and pneu:
            s += d.pick(_PNEU_HEDGE if f.hedged else _PNEU_POS)
    else:
        la = _loc_adj(d, f.side, f.zone)
        if not infectious:
            if f.hedged:
                s = d.pick(
                    (
                        f"possible {size} {la} consolidation",
                        f"questionable {size} {la} consolidation",
                        f"{size} {la} consolidation cannot be excluded",
                    )
                )
            else:
                s = d.pick(
                    (
                        f"{la} consolidation, {size} in extent",
                        f"{size} {la} consolidation",
                        f"{size} focal {la} consolidation",
                    )
                )
        elif f.hedged:
            opts = (
                f"possible {size} {la} consolidation, which may represent early pneumonia",
                f"questionable {size} {la} consolidation, possibly early pneumonia",
                f"{size} {la} consolidation could reflect early pneumonia",
            )
            if not full:
                opts += (f"possible early {la} pneumonia", f"findings may represent early {la} pneumonia")
            s = d.pick(opts)
        else:
            opts = (
                f"{size} {la} consolidation consistent with pneumonia",
                f"{size} {la} consolidation, compatible with pneumonia",
                f"{la} consolidation in keeping with pneumonia",
            )
            if not full:
                opts += (f"{la} pneumonia", f"findings consistent with {la} pneumonia")
            s = d.pick(opts)
    labels = {}
    if "consolidat" in s:
        labels["Consolidation"] = v
        labels["Lung Opacity"] = v
    if "pneumonia" in s:
        labels["Pneumonia"] = v
    return s, labels


def _atelectasis(d: _Draw, f: Finding, x: dict, mode: str, full: bool, pneu: bool):
    v = -1.0 if f.hedged else 1.0
    size = f.size
    la = _loc_adj(d, f.side, "lower")
    if mode == "F":
        if f.hedged:
            s = d.pick(
                (
                    f"{la} opacity likely reflects a {size} area of atelectasis",
                    f"possible {size} {la} atelectasis",
                    f"{la} opacity could reflect {size} atelectasis",
                    f"questionable {size} {la} atelectasis",
                )
            )
        else:
            pp = _loc_pp(d, f.side, "lower")
            s = d.pick(
                (
                    f"there is a {size} area of {la} atelectasis",
                    f"{size} {la} atelectasis is noted",
                    f"{size} plate-like atelectasis {pp}",
                    f"{la} opacity compatible with a {size} area of atelectasis",
                )
            )
    elif f.hedged:
        s = d.pick(
            (
                f"possible {size} {la} atelectasis",
                f"{la} opacity, likely {size} atelectasis",
                f"questionable {size} {la} atelectasis",
            )
        )
    else:
        s = d.pick(
            (f"{size} {la} atelectasis", f"{la} atelectasis, {size} in extent", f"{size} {la} atelectasis is noted")
        )
    return s, {"Atelectasis": v, "Lung Opacity": v}


def _effusion(d: _Draw, f: Finding, x: dict, mode: str, full: bool, pneu: bool):
    v = -1.0 if f.hedged else 1.0
    size, side = f.size, f.side
    if side == "bilateral":
        a, eff, short, be, cpa = "", "pleural effusions", "effusions", "are", "both costophrenic angles"
    else:
        a, eff, short, be, cpa = "a ", "pleural effusion", "effusion", "is", f"the {side} costophrenic angle"
    if mode == "F":
        if f.hedged:
            s = d.pick(
                (
                    f"possible {size} {side} {eff}",
                    f"blunting of {cpa} may represent {a}{size} {side} {eff}",
                    f"{a}{size} {side} {eff} cannot be excluded",
                    f"questionable {size} {side} {eff}",
                    f"findings are suggestive of {a}{size} {side} {eff}",
                )
            )
        else:
            s = d.pick(
                (
                    f"there {be} {a}{size} {side} {eff}",
                    f"{a}{size} {side} {eff} {be} present",
                    f"{a}{size} {side} {eff} {be} seen with blunting of {cpa}",
                    f"{size} {side} {eff}",
                    f"{a}{size} {side} {short} {be} noted",
                )
            )
    elif f.hedged:
        s = d.pick(
            (
                f"possible {size} {side} {eff}",
                f"questionable {size} {side} {short}",
                f"cannot exclude {a}{size} {side} {eff}",
            )
        )
    else:
        s = d.pick((f"{size} {side} {eff}", f"{size} {side} {short}", f"{size} {side} {eff} as described"))
    return s, {"Pleural Effusion": v}


def _pneumothorax(d: _Draw, f: Finding, x: dict, mode: str, full: bool, pneu: bool):
    v = -1.0 if f.hedged else 1.0
    size, side = f.size, f.side
    if side == "bilateral":
        a, ptx, be, apex = "", "pneumothoraces", "are", "both apices"
    else:
        a, ptx, be, apex = "a ", "pneumothorax", "is", f"the {side} apex"
    if mode == "F":
        if f.hedged:
            s = d.pick(
                (
                    f"cannot exclude {a}{size} {side} apical {ptx}",
                    f"possible {size} {side} {ptx}",
                    f"lucency at {apex} may represent {a}{size} {side} {ptx}",
                    f"questionable {size} {side} apical {ptx}",
                )
            )
        else:
            s = d.pick(
                (
                    f"there {be} {a}{size} {side} {ptx}",
                    f"{a}{size} {side} apical {ptx} {be} present",
                    f"{a}{size} {side} {ptx} {be} seen",
                    f"{size} {side} {ptx}",
                )
            )
    elif f.hedged:
        s = d.pick(
            (
                f"possible {size} {side} {ptx}",
                f"cannot exclude {a}{size} {side} {ptx}",
                f"questionable {size} {side} apical {ptx}",
            )
        )
    else:
        s = d.pick((f"{size} {side} {ptx}", f"{size} {side} apical {ptx}", f"{a}{size} {side} {ptx} {be} present"))
    return s, {"Pneumothorax": v}


def _cardiomegaly(d: _Draw, f: Finding, x: dict, mode: str, full: bool, pneu: bool):
    v = -1.0 if f.hedged else 1.0
    sev, sevly = x["sev"]
    if mode == "F":
        if f.hedged:
            s = d.pick(
                (
                    f"possible {sev} cardiomegaly",
                    f"the heart may be {sevly} enlarged",
                    f"the cardiac silhouette is likely {sevly} enlarged",
                    f"questionable {sev} cardiomegaly",
                )
            )
        else:
            s = d.pick(
                (
                    f"{sev} cardiomegaly",
                    f"the heart is {sevly} enlarged",
                    f"the cardiac silhouette is {sevly} enlarged",
                    f"there is {sev} enlargement of the cardiac silhouette",
                    f"{sev} cardiomegaly is present",
                )
            )
    elif f.hedged:
        s = d.pick(
            (
                f"possible {sev} cardiomegaly",
                f"questionable {sev} cardiomegaly",
                f"the heart is possibly {sevly} enlarged",
            )
        )
    else:
        s = d.pick((f"{sev} cardiomegaly", f"{sev} enlargement of the cardiac silhouette", f"{sevly} enlarged heart"))
    return s, {"Cardiomegaly": v, "Enlarged Cardiomediastinum": v}


def _edema(d: _Draw, f: Finding, x: dict, mode: str, full: bool, pneu: bool):
    v = -1.0 if f.hedged else 1.0
    sev = x["sev"][0]
    if mode == "F":
        if f.hedged:
            s = d.pick(
                (
                    f"possible {sev} pulmonary edema",
                    f"perihilar haziness may represent {sev} pulmonary edema",
                    f"findings are suggestive of {sev} interstitial edema",
                    f"questionable {sev} pulmonary edema",
                )
            )
        else:
            s = d.pick(
                (
                    f"there is {sev} pulmonary edema",
                    f"{sev} pulmonary edema",
                    f"{sev} interstitial pulmonary edema with perihilar haziness",
                    f"findings are consistent with {sev} pulmonary edema",
                    f"{sev} pulmonary edema is present",
                )
            )
    elif f.hedged:
        s = d.pick(
            (
                f"possible {sev} pulmonary edema",
                f"findings could reflect {sev} pulmonary edema",
                f"questionable {sev} interstitial edema",
            )
        )
    else:
        s = d.pick(
            (f"{sev} pulmonary edema", f"{sev} interstitial edema", f"findings consistent with {sev} pulmonary edema")
        )
    return s, {"Edema": v, "Lung Opacity": v}


def _covid(d: _Draw, f: Finding, x: dict, mode: str, full: bool, pneu: bool):
    v = -1.0 if f.hedged else 1.0
    ext = x["ext"]
    if mode == "F":
        if f.hedged:
            s = d.pick(
                (
                    f"{ext} peripheral ground-glass opacities in both lower lungs "
                    "could reflect early viral pneumonia/COVID-19",
                    f"possible {ext} bilateral peripheral ground-glass opacities,"
                    " which may represent COVID-19 pneumonia",
                    f"questionable {ext} multifocal ground-glass opacities at the "
                    "lung bases, suspicious for viral pneumonia",
                )
            )
        else:
            s = d.pick(
                (
                    f"{ext} multifocal peripheral ground-glass opacities with lower lung "
                    "predominance, compatible with viral pneumonia/COVID-19",
                    f"there are {ext} bilateral peripheral ground-glass opacities,"
                    " most pronounced in the lower lungs, consistent with COVID-19 pneumonia",
                    f"{ext} patchy peripheral ground-glass opacities in both lower lungs,"
                    " in keeping with viral pneumonia such as COVID-19",
                )
            )
    elif f.hedged:
        s = d.pick(
            (
                f"possible {ext} peripheral ground-glass opacities, which may represent viral pneumonia/COVID-19",
                f"{ext} bilateral ground-glass opacities could reflect early COVID-19 pneumonia",
                f"questionable {ext} peripheral ground-glass opacities, suggestive of viral pneumonia",
            )
        )
    else:
        s = d.pick(
            (
                f"{ext} multifocal peripheral ground-glass opacities compatible with COVID-19 pneumonia",
                f"{ext} bilateral lower lung predominant ground-glass opacities,"
                " consistent with viral pneumonia/COVID-19",
                f"{ext} peripheral ground-glass opacities in keeping with multifocal viral pneumonia",
            )
        )
    return s, {"Pneumonia": v, "Lung Opacity": v}


def _nodule(d: _Draw, f: Finding, x: dict, mode: str, full: bool, pneu: bool):
    v = -1.0 if f.hedged else 1.0
    mm = x["mm"]
    if f.side == "bilateral" and f.count <= 1:
        pp = f"in the {_ZONE_WORD[f.zone]} lung zone"  # one nodule has no 'both sides': name no side
    else:
        pp = _loc_pp(d, f.side, f.zone)
    if f.count <= 1:
        art = _article_mm(mm)
        noun = d.pick(("nodule", "nodular opacity", "pulmonary nodule"))
        np_, be, bare = f"{art} {mm} mm {noun}", "is", f"{mm} mm {noun}"
    else:
        n = _num(f.count)
        np_, be = d.pick(
            (
                (f"{n} nodules measuring up to {mm} mm", "are"),
                (f"{n} pulmonary nodules, the largest measuring {mm} mm,", "are"),
                (f"{n} nodular opacities measuring up to {mm} mm", "are"),
            )
        )
        bare = f"nodules ({n}) measuring up to {mm} mm"
    if mode == "F":
        if f.hedged:
            s = d.pick(
                (
                    f"possible {bare} {pp}",
                    f"questionable {bare} {pp}",
                    f"{np_} {pp} cannot be excluded",
                    f"findings are suggestive of {np_} {pp}",
                )
            )
        else:
            s = d.pick((f"there {be} {np_} {pp}", f"{np_} {be} seen {pp}", f"{np_} {pp}", f"{np_} {be} noted {pp}"))
    elif f.hedged:
        s = d.pick((f"possible {bare} {pp}", f"questionable {bare} {pp}, for which chest CT could be considered"))
    else:
        s = d.pick((f"{np_} {pp}", f"{np_} {pp}, recommend chest CT for further characterization"))
    return s, {"Lung Lesion": v, "Lung Opacity": v}


def _device(d: _Draw, f: Finding, x: dict, mode: str, full: bool, pneu: bool):
    sub = f.subtype
    if sub == "ett":
        cm = x["cm"]
        if mode == "F":
            s = d.pick(
                (
                    f"endotracheal tube terminates {cm} cm above the carina",
                    f"the endotracheal tube tip is {cm} cm above the carina",
                    f"an endotracheal tube is in place with its tip {cm} cm above the carina",
                    f"ET tube tip lies {cm} cm above the carina",
                )
            )
        else:
            s = d.pick(
                (
                    "endotracheal tube in standard position",
                    f"ET tube terminates {cm} cm above the carina",
                    "endotracheal tube in appropriate position",
                )
            )
    elif sub == "ngt":
        if mode == "F":
            s = d.pick(
                (
                    "enteric tube courses below the diaphragm with the tip in the stomach",
                    "a nasogastric tube courses below the diaphragm, tip in the stomach",
                    "an orogastric tube extends below the diaphragm into the stomach",
                    "the enteric tube courses below the diaphragm and out of view",
                )
            )
        else:
            s = d.pick(
                (
                    "enteric tube in the stomach",
                    "nasogastric tube terminates in the stomach",
                    "appropriately positioned enteric tube",
                )
            )
    elif sub == "central_line":
        side = x["dev_side"]
        if mode == "F":
            s = d.pick(
                (
                    f"{side} internal jugular central venous catheter tip is in the SVC",
                    f"a {side} internal jugular central venous catheter terminates in the mid SVC",
                    f"{side} IJ central line with tip in the SVC",
                    f"the {side} internal jugular catheter tip projects over the lower SVC",
                )
            )
        else:
            s = d.pick(
                (
                    f"{side} internal jugular central venous catheter tip in the SVC",
                    f"{side} IJ catheter in standard position",
                    f"{side} IJ central line terminates in the SVC",
                )
            )
    else:  # pacemaker (and anything unknown is written as one)
        side = x["dev_side"]
        if mode == "F":
            s = d.pick(
                (
                    f"{side} chest wall pacemaker with leads in the right atrium and right ventricle",
                    f"a {side}-sided pacemaker is present with leads terminating "
                    "in the right atrium and right ventricle",
                    f"{side} chest wall dual-chamber pacemaker, leads in the right atrium and ventricle",
                    f"there is a {side} pectoral pacemaker with leads in the right atrium and right ventricle",
                )
            )
        else:
            s = d.pick(
                (
                    f"{side} chest wall pacemaker with leads in standard position",
                    "pacemaker leads in the right atrium and right ventricle",
                    f"{side}-sided pacemaker in place",
                )
            )
    return s, {"Support Devices": 1.0}


def _foreign_object(d: _Draw, f: Finding, x: dict, mode: str, full: bool, pneu: bool):
    n = f.count
    z = _ZONE_WORD[f.zone]
    region = (
        f"the {z} chest" if f.side == "bilateral" else d.pick((f"the {f.side} hemithorax", f"the {f.side} {z} chest"))
    )
    one = n <= 1
    sub = f.subtype
    if sub == "coin":
        if one:
            s = d.pick(
                (
                    f"round metallic density projects over {region}, compatible with a coin",
                    f"a coin-shaped metallic density overlies {region}",
                    f"there is a round metallic density over {region}, consistent with a coin",
                )
            )
        else:
            s = d.pick(
                (
                    f"{_num(n)} round metallic densities project over {region}, compatible with coins",
                    f"{_num(n)} coin-shaped metallic densities overlie {region}",
                    f"there are {_num(n)} round metallic densities over {region}, consistent with coins",
                )
            )
    elif sub == "button":
        if one:
            s = d.pick(
                (
                    f"a button projects over {region}",
                    f"a round radiodense button overlies {region}, external to the patient",
                    f"button artifact overlies {region}",
                )
            )
        else:
            s = d.pick(
                (
                    f"{_num(n)} buttons project over {region}",
                    f"{_num(n)} radiodense buttons overlie {region}, external to the patient",
                    f"button artifacts overlie {region}",
                )
            )
    elif sub == "clip":
        if one:
            s = d.pick(
                (
                    f"a surgical clip projects over {region}",
                    f"a surgical clip is noted over {region}",
                    f"there is a surgical clip in {region}",
                )
            )
        else:
            s = d.pick(
                (
                    f"surgical clips are noted over {region}",
                    f"{_num(n)} surgical clips project over {region}",
                    f"there are surgical clips in {region}",
                )
            )
    else:  # wire
        if one:
            s = d.pick(
                (
                    f"overlying wire projects over {region}",
                    f"an external wire overlies {region}",
                    f"a metallic wire is seen over {region}",
                )
            )
        else:
            s = d.pick(
                (
                    f"overlying wires project over {region}",
                    f"external wires overlie {region}",
                    f"{_num(n)} metallic wires are seen over {region}",
                )
            )
    return s, {}


_WRITERS = {
    "consolidation": _consolidation,
    "atelectasis": _atelectasis,
    "effusion": _effusion,
    "pneumothorax": _pneumothorax,
    "cardiomegaly": _cardiomegaly,
    "edema": _edema,
    "covid": _covid,
    "nodule": _nodule,
    "device": _device,
    "foreign_object": _foreign_object,
}


def _attributes(d: _Draw, f: Finding) -> dict:
    """Numbers fixed once per finding so that findings and impression agree."""
    k = f.kind
    if k in ("cardiomegaly", "edema"):
        return {"sev": d.pick(_SEVERITY.get(f.size, _SEVERITY["moderate"]))}
    if k == "covid":
        return {"ext": d.pick(_EXTENT.get(f.size, _EXTENT["moderate"]))}
    if k == "nodule":
        lo, hi = {"small": (5, 8), "moderate": (10, 20)}.get(f.size, (22, 28))
        return {"mm": d.integer(lo, hi)}
    if k == "device":
        if f.subtype == "ett":
            return {"cm": d.integer(3, 6)}
        if f.subtype == "central_line":
            return {"dev_side": f.side if f.side in ("right", "left") else "right"}
        return {"dev_side": f.side if f.side in ("right", "left") else "left"}
    return {}


# --------------------------------------------------------------------------------------------
# negations of absent findings: (item, probability, labels, list noun, stand-alone sentences)

_NEGATABLE = (
    (
        "pneumothorax",
        0.6,
        {"Pneumothorax": 0.0},
        ("pneumothorax",),
        ("no pneumothorax", "there is no pneumothorax", "no pneumothorax is seen"),
    ),
    (
        "effusion",
        0.6,
        {"Pleural Effusion": 0.0},
        ("pleural effusion", "effusion"),
        ("no pleural effusion", "there is no pleural effusion", "no pleural effusion is seen"),
    ),
    (
        "consolidation",
        0.5,
        {"Consolidation": 0.0},
        ("focal consolidation", "consolidation"),
        ("there is no focal consolidation", "no focal consolidation is seen", "no focal consolidation"),
    ),
    (
        "pneumonia",
        0.2,
        {"Pneumonia": 0.0},
        ("pneumonia",),
        ("no evidence of pneumonia", "no radiographic evidence of pneumonia", "there is no pneumonia"),
    ),
    (
        "edema",
        0.4,
        {"Edema": 0.0},
        ("pulmonary edema", "edema"),
        ("no pulmonary edema", "there is no pulmonary edema", "there is no evidence of pulmonary edema"),
    ),
)
_HEART_AND_MEDIASTINUM = {"Cardiomegaly": 0.0, "Enlarged Cardiomediastinum": 0.0}
_CARDIAC_NEG = (  # a normal heart also negates an enlarged cardiomediastinum (same value rule)
    ("heart size is normal", _HEART_AND_MEDIASTINUM),
    ("the heart is normal in size", _HEART_AND_MEDIASTINUM),
    ("heart size is within normal limits", _HEART_AND_MEDIASTINUM),
    ("the cardiac and mediastinal silhouettes are unremarkable", _HEART_AND_MEDIASTINUM),
    ("the cardiac silhouette is normal in size", _HEART_AND_MEDIASTINUM),
    # names no heart: only the cardiomediastinal observation, as the CheXpert labeler reads it
    ("the cardiomediastinal silhouette is normal", {"Enlarged Cardiomediastinum": 0.0}),
    ("mediastinal contours are normal", {"Enlarged Cardiomediastinum": 0.0}),
)
_P_CARDIAC_NEG = 0.55
_LIST_FORMS = ("no {}", "there is no {}", "no evidence of {}")


def _join_list(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} or {items[1]}"
    return ", ".join(items[:-1]) + ", or " + items[-1]


def _negations(d: _Draw, present: set[str], scale: float) -> list[tuple[str, dict]]:
    """Negated sentences for a random subset of absent findings."""
    chosen = []
    for item, p, labels, nouns, alone in _NEGATABLE:
        if item in ("consolidation", "pneumonia"):
            if "consolidation" in present or "covid" in present:
                continue
        elif item in present:
            continue
        if d.chance(p * scale):
            chosen.append((labels, nouns, alone))
    out: list[tuple[str, dict]] = []
    d.shuffle(chosen)
    i = 0
    while i < len(chosen):
        k = min(len(chosen) - i, 1 + int(d.u() * 3))  # groups of 1-3
        group = chosen[i : i + k]
        i += k
        if k == 1:
            labels, nouns, alone = group[0]
            out.append((d.pick(alone), labels))
        else:
            labs: dict = {}
            for g in group:
                labs.update(g[0])
            out.append((d.pick(_LIST_FORMS).format(_join_list([d.pick(g[1]) for g in group])), labs))
    if "cardiomegaly" not in present and d.chance(_P_CARDIAC_NEG * scale):
        out.append(d.pick(_CARDIAC_NEG))
    return out


# --------------------------------------------------------------------------------------------
# layout

_NORMAL_IMPRESSION = (
    "no acute cardiopulmonary process",
    "no acute intrathoracic process",
    "no acute cardiopulmonary abnormality",
    "no radiographic evidence of acute cardiopulmonary disease",
)
_OSSEOUS = (
    "imaged osseous structures are intact",
    "no acute osseous abnormality is seen",
    "the visualized osseous structures are unremarkable",
    "bony structures are intact",
)
_CLEAR = ("the lungs are clear", "lungs are clear bilaterally", "the lungs are well expanded and clear")
_LUNG_KINDS = frozenset(("consolidation", "atelectasis", "edema", "covid", "nodule", "effusion", "pneumothorax"))
_NOT_FINDINGS = frozenset(("device", "foreign_object"))


def _technique(d: _Draw, exam: str, view: str) -> str:
    e = exam.upper()
    if "PORTABLE" in e or (view == "AP" and "LAT" not in e):
        return d.pick(
            (
                "portable AP view of the chest was obtained",
                "single portable AP chest radiograph was obtained",
                "a portable frontal view of the chest was provided",
            )
        )
    if "LAT" in e:
        if "PA" in e:
            return d.pick(
                (
                    "PA and lateral views of the chest were obtained",
                    "PA and lateral views of the chest provided",
                    "frontal and lateral views of the chest were obtained",
                )
            )
        return d.pick(
            (
                "frontal and lateral views of the chest were obtained",
                "frontal and lateral radiographs of the chest were provided",
            )
        )
    return d.pick(
        (
            "single frontal view of the chest was obtained",
            "frontal view of the chest provided",
            "a frontal radiograph of the chest was obtained",
        )
    )


def _wrap(text: str, first: str) -> list[str]:
    """Greedy wrap of `text` (double spaces between sentences kept) into lines of <= _WIDTH chars,
    the first starting with `first`, the others with one space."""
    lines: list[str] = []
    cur = first
    fresh = True  # nothing but the prefix on the current line
    pending = 0
    for tok in text.split(" "):
        if not tok:
            pending += 1
            continue
        if fresh:
            cur += tok
            fresh = False
        elif len(cur) + pending + 1 + len(tok) <= _WIDTH:
            cur += " " * (pending + 1) + tok
        else:
            lines.append(cur)
            cur = " " + tok
        pending = 0
    lines.append(cur)
    return lines


def _paragraph(sentences: list[str]) -> str:
    return "  ".join(_cap(s) + "." for s in sentences)


def _indication(d: _Draw, case: Case) -> str:
    male = case.sex == "M"
    ind = case.indication.strip()
    who = d.pick(
        (
            f"___ year old {'man' if male else 'woman'}",
            f"___-year-old {'male' if male else 'female'}",
            f"___ y/o {'M' if male else 'F'}",
            f"___{'M' if male else 'F'}",
        )
    )
    s = f"{who} with {ind}" if ind else who
    if d.chance(0.25):
        s += "  // " + d.pick(("eval for acute process", "?acute process", "eval", "please evaluate"))
    return s


def write_report(
    case: Case, exam: str, rng: np.random.Generator, p_no_findings: float, p_no_impression: float
) -> Report:
    """The report of one study: MIMIC-CXR free-text style, with CheXpert-convention labels."""
    d = _Draw(rng)

    # ---- which sections
    no_f = d.chance(p_no_findings)
    no_i = d.chance(p_no_impression)
    if no_f and no_i:
        no_i = False
    combined = (not no_f) and (not no_i) and d.chance(_P_COMBINED)
    conclusion = d.chance(_P_CONCLUSION)
    has_f_section = not no_f and not combined  # a separate FINDINGS section
    has_i_section = not no_i and not combined  # a separate IMPRESSION section

    findings = case.findings
    present = {f.kind for f in findings}
    attrs = [_attributes(d, f) for f in findings]
    mention_object = [f.kind != "foreign_object" or d.chance(_P_MENTION_OBJECT) for f in findings]
    abnormal = [i for i, f in enumerate(findings) if f.kind not in _NOT_FINDINGS]
    lungs_free = not (present & _LUNG_KINDS)

    labels: dict = {}
    blocks: list[str] = [HEADER_LINE]
    blocks.extend(_wrap(exam, " EXAMINATION:  "))
    blocks.append(" ")
    blocks.extend(_wrap(_indication(d, case), " INDICATION:  "))
    blocks.append(" ")
    blocks.append(" COMPARISON:  " + ("___" if case.has_comparison else "None."))

    # ---- findings (or combined) body
    if not no_f:
        body: list[tuple[str, dict]] = []
        for i, f in enumerate(findings):
            if not mention_object[i]:
                continue
            pneu = combined or not has_i_section or d.chance(0.4)
            body.append(_WRITERS[f.kind](d, f, attrs[i], "F", True, pneu))
        body.extend(_negations(d, present, 1.0))
        if lungs_free and d.chance(0.5):
            body.append((d.pick(_CLEAR), {}))
        if d.chance(0.35):
            body.append((d.pick(_OSSEOUS), {}))
        if d.chance(0.1):
            body.append(("the visualized upper abdomen is unremarkable", {}))
        if not body:
            body.append((d.pick(_CLEAR) if lungs_free else d.pick(_OSSEOUS), {}))
        d.shuffle(body)
        if combined and not abnormal and d.chance(0.5):
            body.append((d.pick(_NORMAL_IMPRESSION), {}))
        sents = [s for s, _ in body]
        for _, lab in body:
            _merge(labels, lab)
        if d.chance(0.6):
            sents.insert(0, _technique(d, exam, case.view))
        blocks.append(" ")
        blocks.append(" FINDINGS AND IMPRESSION: " if combined else " FINDINGS: ")
        blocks.append(" ")
        if len(sents) >= 4 and d.chance(0.25):
            cut = d.integer(2, len(sents) - 2)
            blocks.extend(_wrap(_paragraph(sents[:cut]), " "))
            blocks.append(" ")
            blocks.extend(_wrap(_paragraph(sents[cut:]), " "))
        else:
            blocks.extend(_wrap(_paragraph(sents), " "))

    # ---- impression body
    if has_i_section:
        full = not has_f_section  # the impression alone must carry every finding
        items: list[tuple[str, dict]] = []
        order = list(abnormal)
        d.shuffle(order)
        for i in order:
            items.append(_WRITERS[findings[i].kind](d, findings[i], attrs[i], "I", full, True))
        for i, f in enumerate(findings):
            if f.kind == "device" and (full or d.chance(0.4)):
                items.append(_device(d, f, attrs[i], "I", full, True))
            elif f.kind == "foreign_object" and full and mention_object[i]:
                items.append(_foreign_object(d, f, attrs[i], "F", full, True))
        if not abnormal and (not items or d.chance(0.85)):
            normal = (d.pick(_NORMAL_IMPRESSION), {})
            if d.chance(0.6):
                items.insert(0, normal)
            else:
                items.append(normal)
        negs = _negations(d, present, 0.5 if full else 0.3)
        items.extend(negs)
        for _, lab in items:
            _merge(labels, lab)
        blocks.append(" ")
        blocks.append(" CONCLUSION: " if conclusion else " IMPRESSION: ")
        blocks.append(" ")
        if len(items) >= 2 and d.chance(0.3):
            for n, (s, _) in enumerate(items, 1):
                blocks.extend(_wrap(f"{n}. {_cap(s)}.", " "))
        else:
            blocks.extend(_wrap(_paragraph([s for s, _ in items]), " "))

    out = {k: labels.get(k) for k in CHEXPERT_LABELS}
    out["No Finding"] = None if abnormal else 1.0
    out["Fracture"] = None
    out["Pleural Other"] = None
    return Report(
        text="\n".join(blocks) + "\n",
        labels=out,
        has_findings=not no_f,
        has_impression=not no_i,
    )
