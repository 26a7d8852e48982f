"""How much of the downstream labels the demo corpus gives M-FLAG to learn, and where M-FLAG lands.

Three measurements on a workspace that `dvc repro` has run (its params.yaml, caches, embeddings, encoders and
reports; nothing in it is written):

1. Text probe. On MIMIC's official split (probes fit on `train`, scored on `test`, and again on `valid` and
   `test` together), a logistic regression on the frozen report embeddings (data/embeddings/mimic.npy)
   predicts the synthetic world's true findings (data/synthetic/truth/mimic.jsonl) for the labels the
   classification jobs use. The same probe on the frozen, pooled 2048-d image features of the same images,
   from each encoder of `encoders` and from the supervised trunk of 2., shows text and image signal on
   identical cases. Per-label AUC with a percentile bootstrap interval over the scored cases (mflag.stats).
2. Upper bound. A ResNet-50 trunk with M-FLAG's init (model.vision.init, the pretraining seed) trained with
   the true finding kinds as multi-label BCE targets on MIMIC's training images, with the pretraining budget
   and machinery (`pretrain`: epochs, batch size, data order, AdamW and its schedule, augmentation,
   precision; mflag.pretrain, mflag.augment), then the linear probes of cls_chexpert, cls_rsna and cls_covidx
   at 1, 10 and 100 % exactly as stages/finetune.py runs them (same params, seeds, test resamples).
3. Where M-FLAG sits: per job and fraction, random init, M-FLAG, ConVIRT-style (the workspace's
   reports/metrics.json) and the bound, and M-FLAG's position (M-FLAG - random) / (bound - random).

Every choice is fixed here or in params.yaml before the run (the probe's C = 1 on standardised features, the
label definitions, the splits); nothing is tuned on the scored cases. Writes a Markdown file atomically; the
hand-written part above its marker line is kept when the file exists.

    PYTHONPATH=. python scripts/signal_probe.py [--workspace .] [--out docs/signal.md]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as nnf  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from mflag.augment import AugmentSpec, augment_batch  # noqa: E402
from mflag.distributed import DistEnv, resolve_device, resolve_precision  # noqa: E402
from mflag.encoders import encoder, load_encoder  # noqa: E402
from mflag.finetune.checks import cell_record, check_subsets  # noqa: E402
from mflag.finetune.classify import ClassifyConfig, ProbeCases, encode_features, probe_over_seeds  # noqa: E402
from mflag.finetune.data import load_task_data, fingerprint_test_set  # noqa: E402
from mflag.io import atomic_write  # noqa: E402
from mflag.jobs import JOBS, PCTS  # noqa: E402
from mflag.models import build_trunk, resnet50_trunk, trunk_stages  # noqa: E402
from mflag.params import Params, load_or_exit  # noqa: E402
from mflag.pretrain import (TrainConfig, _seed, autocast_dtype, batch_stream, epoch_batches,  # noqa: E402
                            load_data, make_optimizer)  # fmt: skip
from mflag.stats import interval, paired_difference, replicates, resample_indices  # noqa: E402
from mflag.synth.world import FINDING_KINDS  # noqa: E402

MARKER = "<!-- Everything below is written by scripts/signal_probe.py; edit above this line only. -->"
C = 1.0  # the probes' inverse L2 strength on standardised features: scikit-learn's default, fixed in advance
MAX_ITER = 5000

# The labels of the classification jobs, read off the synthetic world (mflag/synth): label -> (the finding
# kinds that make it positive, "any" or "none" of them, the jobs' labels it stands for).
# CheXpert's five are the finding kinds of the same names (its label columns come from the reports of those
# findings). RSNA's positive is an image with a pneumonia box, and the renderer draws a box for each
# consolidation patch (mflag/synth/render.py, _consolidation). COVIDx's classes are drawn as forced findings
# (mflag/synth/corpus.py, plan_covidx): pneumonia = a consolidation, COVID-19 = covid, normal = none of
# consolidation, covid, effusion, edema, pneumothorax.
TARGETS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "atelectasis": (("atelectasis",), "any", "CheXpert Atelectasis"),
    "cardiomegaly": (("cardiomegaly",), "any", "CheXpert Cardiomegaly"),
    "consolidation": (("consolidation",), "any", "CheXpert Consolidation; RSNA target; COVIDx pneumonia"),
    "edema": (("edema",), "any", "CheXpert Edema"),
    "effusion": (("effusion",), "any", "CheXpert Pleural Effusion"),
    "covid": (("covid",), "any", "COVIDx COVID-19"),
    "normal": (("consolidation", "covid", "effusion", "edema", "pneumothorax"), "none", "COVIDx normal"),
}


# ------------------------------------------------------------------------------------------------ pure logic
def truth_targets(findings: list) -> dict[str, int]:
    """0/1 per label of TARGETS for one truth row's findings ([kind, side, zone, size, hedged, subtype] each).
    A hedged finding is present: the world drew it; only its report is uncertain."""
    kinds = {f[0] for f in findings}
    unknown = kinds - set(FINDING_KINDS)
    if unknown:
        raise ValueError(f"unknown finding kind(s) {sorted(unknown)}; the world knows {', '.join(FINDING_KINDS)}")
    out = {}
    for label, (needed, rule, _) in TARGETS.items():
        hit = bool(kinds & set(needed))
        out[label] = int(hit if rule == "any" else not hit)
    return out


def kind_targets(findings: list, kinds: tuple[str, ...]) -> np.ndarray:
    """(len(kinds),) float32 0/1: which of `kinds` the row's findings hold (the supervised trunk's targets)."""
    present = {f[0] for f in findings}
    return np.array([k in present for k in kinds], dtype=np.float32)


def position(mflag: float, random: float, bound: float) -> float | None:
    """M-FLAG's place between random init (0) and the supervised bound (1); None where the bound is not above
    random (the scale is then undefined)."""
    if not bound > random:
        return None
    return (mflag - random) / (bound - random)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _ci(value: float | None, lo: float | None, hi: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{_fmt(value, digits)} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def _diff(value: float | None, lo: float | None, hi: float | None) -> str:
    if value is None:
        return "n/a"
    star = "*" if lo is not None and hi is not None and (lo > 0 or hi < 0) else ""
    return f"{_signed(value)} [{_signed(lo)}, {_signed(hi)}]{star}"


# ------------------------------------------------------------------------------------------------ MIMIC rows
@dataclass
class Mimic:
    index: pd.DataFrame  # the cache's rows (data/cache/mimic/index.csv)
    images: np.ndarray  # (N, S, S) uint8
    text: np.ndarray  # (N, D) frozen-LM report embeddings, row-aligned
    findings: list[list]  # per row: the truth's findings
    y: np.ndarray  # (N, len(TARGETS)) 0/1


def load_mimic(ws: Path, params: Params) -> Mimic:
    cache = ws / "data/cache/mimic"
    index = pd.read_csv(cache / "index.csv", dtype=str, keep_default_na=False)
    images = np.load(cache / "images.npy", mmap_mode="r")
    text = np.load(ws / "data/embeddings/mimic.npy").astype(np.float32)
    if not len(index) == len(images) == len(text):
        sys.exit(f"error: signal: {cache} ({len(index)} rows, {len(images)} images) and data/embeddings/mimic.npy "
                 f"({len(text)}) are not row-aligned; re-run preprocess@mimic and embed_text")  # fmt: skip
    truth_file = ws / params.synthetic.out_dir / "truth/mimic.jsonl"
    truth = {}
    for line in truth_file.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            truth[row["path"]] = row["findings"]
    missing = [p for p in index["path"] if p not in truth]
    if missing:
        sys.exit(f"error: signal: {len(missing)} cached images have no row in {truth_file} (first {missing[0]}); "
                 "this script needs the synthetic corpus' truth")  # fmt: skip
    findings = [truth[p] for p in index["path"]]
    y = np.array([list(truth_targets(f).values()) for f in findings], dtype=np.int64)
    return Mimic(index, images, text, findings, y)


# ----------------------------------------------------------------------------------------------- the probes
def probe_scores(x: np.ndarray, y: np.ndarray, train: np.ndarray) -> np.ndarray:
    """(N, L) decision values on every row of one logistic regression per label column of `y`, fit on `train`
    (NaN for a label with one class in train)."""
    out = np.zeros((len(x), y.shape[1]), dtype=np.float64)
    for k in range(y.shape[1]):
        if len(np.unique(y[train, k])) < 2:
            out[:, k] = np.nan  # nothing to learn: one class in train
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=MAX_ITER))
        model.fit(x[train], y[train, k])
        out[:, k] = model.decision_function(x)
    return out


def auc_table(scores: np.ndarray, y: np.ndarray, idx: np.ndarray, level: float) -> list[tuple]:
    """Per label column: (AUC, lo, hi) on the scored cases, the interval over the resamples `idx` (B, n)."""
    rows = []
    for k in range(y.shape[1]):
        s, t = scores[:, k], y[:, k]
        if np.isnan(s).any() or len(np.unique(t)) < 2:
            rows.append((None, None, None))
            continue
        cases = ProbeCases("auc", s[None, :, None].astype(np.float32), t[:, None].astype(bool))
        lo, hi = interval(replicates(cases, idx), level)
        rows.append((float(roc_auc_score(t, s)), lo, hi))
    return rows


# ------------------------------------------------------------------------------------ the supervised bound
def train_supervised(ws: Path, params: Params, mimic: Mimic) -> tuple[dict, list[str], list[float]]:
    """The bound's trunk: M-FLAG's init trained on MIMIC's train images with the true finding kinds as multi-label
    BCE targets, with the pretraining budget. Returns its state dict, the kinds and the mean loss per epoch."""
    p = params.pretrain
    device = torch.device(resolve_device(p.device))
    precision = resolve_precision(p.precision, device, "pretrain.precision")
    seed = p.run_seed(params.seed)
    data = load_data(ws / "data/cache/mimic", ws / "data/embeddings/mimic.npy")
    kinds = tuple(k for k in FINDING_KINDS if any(k in {f[0] for f in mimic.findings[i]} for i in data.train_idx))
    targets = torch.from_numpy(np.stack([kind_targets(f, kinds) for f in mimic.findings]))
    trunk = build_trunk(params.model.vision.init, str(ws / params.model.vision.imagenet_weights), seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the head is drawn where M-FLAG draws its projectors
        head = nn.Linear(2048, len(kinds))
    model = nn.Sequential(trunk, head)
    frozen = trunk_stages(trunk, p.frozen_stages)
    for m in frozen:
        m.requires_grad_(False)
    # the pretraining run's config (mflag.pretrain): its data order, optimiser and schedule; the objective's
    # own fields are not used here
    cfg = TrainConfig(
        epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay, betas=tuple(p.betas),
        restart_fraction=p.restart_fraction, eta_min=p.eta_min, precision=precision, channels_last=p.channels_last,
        workers=p.workers, augment=AugmentSpec(crop=p.crop, rotation=tuple(p.rotation), perspective_p=p.perspective_p,
                                               perspective_distortion=p.perspective_distortion,
                                               autocontrast_p=p.autocontrast_p),
        seed=seed, log_every=p.log_every, objective="mflag", ortho_weight=params.loss.ortho_weight,
        ortho_offdiag_weight=params.loss.ortho_offdiag_weight, ortho_on=params.loss.ortho_on,
    )  # fmt: skip
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    n_steps = len(epoch_batches(data, cfg, 0, env))
    opt, sched = make_optimizer(model, cfg, cfg.epochs * n_steps)
    dtype = autocast_dtype(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    losses = []
    for epoch in range(cfg.epochs):
        model.train()
        for m in frozen:
            m.eval()
        aug_gen = torch.Generator().manual_seed(_seed(cfg.seed, "augment", 0, epoch))  # pretraining's draws
        batches = epoch_batches(data, cfg, epoch, env)
        total, t0 = 0.0, time.perf_counter()
        for rows, (img_u8, _) in zip(batches, batch_stream(data, batches, cfg.workers, pin=device.type == "cuda")):
            images = augment_batch(img_u8.to(device), cfg.augment, aug_gen)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(images)
            loss = nnf.binary_cross_entropy_with_logits(logits.float(), targets[torch.from_numpy(rows)].to(device))
            if not torch.isfinite(loss):
                sys.exit(f"error: signal: non-finite supervised loss at epoch {epoch + 1}")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            total += loss.item()
        losses.append(total / n_steps)
        print(f"signal: supervised epoch {epoch + 1}/{cfg.epochs}: BCE {losses[-1]:.4f} "
              f"({time.perf_counter() - t0:.0f} s, {precision})", flush=True)  # fmt: skip
    state = {k: v.detach().cpu().contiguous().clone() for k, v in trunk.state_dict().items()}
    return state, list(kinds), losses


def evaluate_cls(ws: Path, params: Params, state: dict, mean, std) -> dict:
    """The supervised trunk's cls cells as stages/finetune.py computes them: per (job, pct) the record, the
    bootstrap replicates on the job's resamples, and the test set's fingerprint."""
    ft = params.finetune
    device = resolve_device(ft.device)
    precision = resolve_precision(ft.precision, torch.device(device), "finetune.precision")
    trunk = resnet50_trunk()
    trunk.load_state_dict(state)
    trunk.to(device)
    out = {}
    for job in (j for j in JOBS.values() if j.task == "cls"):
        data = load_task_data(ws / "data/cache" / job.dataset, job.dataset, job.task)
        resamples = resample_indices(len(data.test_rows), params.stats.resamples, params.seed, job.name)
        features = None
        for pct in PCTS:
            fraction = data.at_fraction(pct)
            check = check_subsets(fraction, job.task, pct)
            cfg = dataclasses.replace(ClassifyConfig.from_params(ft.cls, job.dataset, pct, precision), mean=mean, std=std)
            if not cfg.augment and features is None:  # deterministic crops: one pass serves every fraction
                features = encode_features(trunk, data.images, np.arange(len(data.index)), cfg, device, progress=False)
            result = probe_over_seeds(trunk, fraction, cfg, device, [params.seed + k for k in range(ft.cls.seeds)],
                                      features=features, progress=False)  # fmt: skip
            reps = replicates(result.pop("cases"), resamples)
            record = cell_record(result, job.metric, check.not_evaluable)
            out[(job.name, pct)] = {"record": record, "reps": reps, "test_set": fingerprint_test_set(fraction)}
            print(f"signal: supervised {job.name} {pct}%: {job.metric} {_fmt(record.get(job.metric), 4)}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ the report
def _cell_reps(ws: Path, cell: str) -> tuple[np.ndarray, str]:
    folder = ws / "reports/finetune" / cell
    reps = pd.read_csv(folder / "bootstrap.csv").iloc[:, 0].to_numpy(np.float64)
    return reps, json.loads((folder / "metrics.json").read_text())["test_set"]


def standing(ws: Path, params: Params, supervised: dict) -> list[dict]:
    """Per cls job and fraction: each encoder's value and interval (reports/metrics.json), the bound, the paired
    differences from random, and M-FLAG's position."""
    study = json.loads((ws / "reports/metrics.json").read_text())
    level = params.stats.level
    rows = []
    for job in (j for j in JOBS.values() if j.task == "cls"):
        m = job.metric
        for pct in PCTS:
            key = f"pct{pct}"
            cells = {e: study[job.name][e][key] for e in ("random", "mflag", "convirt") if e in study[job.name]}
            sup = supervised[(job.name, pct)]
            bound = sup["record"].get(m)
            b_lo, b_hi = interval(sup["reps"], level)
            r_reps, r_set = _cell_reps(ws, f"{job.name}-{pct}-random")
            if r_set != sup["test_set"] or len(r_reps) != len(sup["reps"]):
                sys.exit(f"error: signal: {job.name}-{pct}-random was scored on other test cases or resamples "
                         "than this run; re-run the workspace's pipeline with this params.yaml")  # fmt: skip
            d_lo, d_hi = paired_difference(sup["reps"], r_reps, level)
            r, f = cells["random"][m], cells["mflag"][m]
            vs = cells["mflag"].get("vs_random", {})
            rows.append({
                "job": job, "pct": pct, "cells": cells, "bound": (bound, b_lo, b_hi),
                "bound_minus_random": (None if bound is None or r is None else bound - r, d_lo, d_hi),
                "mflag_minus_random": (vs.get(f"{m}_diff"), vs.get(f"{m}_diff_lo"), vs.get(f"{m}_diff_hi")),
                "position": None if None in (r, f, bound) else position(f, r, bound),
            })  # fmt: skip
    return rows


DEFAULT_HEADER = f"""# Signal the method can learn, measured

Written by `scripts/signal_probe.py` (hand-written part: 2026-12-07). Regenerate, in a workspace where `dvc repro`
has run, with

    PYTHONPATH=. python scripts/signal_probe.py --workspace . --out docs/signal.md

{MARKER}
"""


def render(ws: Path, params: Params, probe: dict, kinds: list[str], losses: list[float], rows: list[dict],
           seconds: float) -> str:  # fmt: skip
    level = params.stats.level
    p = params.pretrain
    lines = [f"## Generated on the workspace `{ws}`", ""]
    lines += [
        "### 1. Text probe: how well the frozen report embeddings predict the labels", "",
        f"A logistic regression per label (scikit-learn, C = {C:g}, on standardised features), fit on MIMIC's "
        f"official `train` split ({probe['n_train']} images) and scored on `test` ({probe['n']['test']} images), "
        f"then on `valid` and `test` together ({probe['n']['held']} images); the splits are patient-level, so no "
        "scored patient was seen in training. Targets are the synthetic world's true findings of each image "
        "(`data/synthetic/truth/mimic.jsonl`), not the report's CheXpert labels. Inputs: the frozen language "
        f"model's report embedding ({probe['text_dim']}-d, `data/embeddings/mimic.npy`), or the frozen pooled "
        "2048-d features of the same image (centre crop, `finetune.cls` crop and precision) from each trunk. "
        f"AUC with its {100 * level:g}% percentile bootstrap interval over the scored cases ({params.stats.resamples} "
        "resamples, the same for every input). `pos`: positives among the scored cases.", "",
    ]  # fmt: skip
    sources = list(probe["sources"])
    for split in ("test", "held"):
        title = "test" if split == "test" else "valid + test"
        lines += [f"**Scored on {title}** ({probe['n'][split]} images)", ""]
        lines.append("| label | stands for | pos | " + " | ".join(sources) + " |")
        lines.append("|---|---|---:|" + "---:|" * len(sources))
        for k, label in enumerate(TARGETS):
            cells = [_ci(*probe["auc"][(s, split)][k]) for s in sources]
            lines.append(f"| {label} | {TARGETS[label][2]} | {probe['pos'][split][k]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "### 2. The supervised upper bound", "",
        f"A ResNet-50 with M-FLAG's init (`model.vision.init` {params.model.vision.init}, seed "
        f"{p.run_seed(params.seed)}) trained on MIMIC's {probe['n_train']} training images to predict the true "
        f"finding kinds ({', '.join(kinds)}) with multi-label BCE, on M-FLAG's pretraining budget and machinery: "
        f"{p.epochs} epochs of batch {p.batch_size}, the same data order and augmentation draws, AdamW (lr {p.lr:g}, "
        f"weight decay {p.weight_decay:g}) with the warm-restart cosine schedule, crop {p.crop}, precision "
        f"`{p.precision}` resolved as the pipeline does. Mean BCE per epoch: "
        f"{', '.join(f'{x:.4f}' for x in losses)}. Its trunk then went through the linear probes of "
        "`stages/finetune.py` (same params, probe seeds and test resamples as the workspace's cells).", "",
        "### 3. Where M-FLAG sits", "",
        f"Test metric (AUC; accuracy for COVIDx) with its {100 * level:g}% bootstrap interval. Random, M-FLAG and "
        "ConVIRT-style are the workspace's cells (`reports/metrics.json`); `bound` is the supervised trunk. "
        "`bound - random` and `M-FLAG - random` are paired differences on the same resamples (*: the interval "
        "excludes 0). `position` = (M-FLAG - random) / (bound - random): 0 is random init, 1 the bound.", "",
        "| job | % | random | M-FLAG | ConVIRT-style | bound | bound - random | M-FLAG - random | position |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    undefined, uncertain = [], False
    for r in rows:
        m, cells = r["job"].metric, r["cells"]
        vals = [_ci(c[m], c.get(f"{m}_lo"), c.get(f"{m}_hi")) if c else "n/a"
                for c in (cells.get("random"), cells.get("mflag"), cells.get("convirt"))]  # fmt: skip
        pos = r["position"]
        d_lo = r["bound_minus_random"][1]
        shown = "undefined" if pos is None else f"{pos:+.2f}" + ("" if d_lo is not None and d_lo > 0 else " (?)")
        uncertain |= pos is not None and not (d_lo is not None and d_lo > 0)
        if pos is None:
            undefined.append(f"{r['job'].label} {r['pct']}%")
        lines.append(f"| {r['job'].label} ({m.upper()}) | {r['pct']} | " + " | ".join(vals)
                     + f" | {_ci(*r['bound'])} | {_diff(*r['bound_minus_random'])} | "
                     f"{_diff(*r['mflag_minus_random'])} | {shown} |")  # fmt: skip
    if uncertain:
        lines.append("")
        lines.append("(?): the bound is above random, but the paired interval of `bound - random` does not exclude 0, "
                     "so the scale the position is measured on is itself uncertain.")  # fmt: skip
    if undefined:
        lines.append("")
        lines.append(f"Position undefined for {', '.join(undefined)}: there the supervised bound is not above "
                     "random init, so the scale from random to the bound does not exist.")  # fmt: skip
    lines += ["", f"Run time: {seconds / 60:.1f} minutes on this machine ({torch.get_num_threads()} torch threads).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", type=Path, default=Path("."), help="a workspace where `dvc repro` has run")
    ap.add_argument("--out", type=Path, default=Path("docs/signal.md"))
    args = ap.parse_args()
    start = time.perf_counter()
    ws = args.workspace.resolve()
    params = load_or_exit(ws / "params.yaml")
    level, resamples = params.stats.level, params.stats.resamples
    ft = params.finetune
    device = resolve_device(ft.device)
    precision = resolve_precision(ft.precision, torch.device(device), "finetune.precision")

    print("signal: reading MIMIC (cache, report embeddings, truth)", flush=True)
    mimic = load_mimic(ws, params)
    split = mimic.index["split"].to_numpy()
    train = np.flatnonzero(split == "train")
    scored = {"test": np.flatnonzero(split == "test"), "held": np.flatnonzero(split != "train")}
    if len(scored["test"]) == 0:
        sys.exit("error: signal: MIMIC has no test rows in this workspace (data.mimic / the official split)")
    idx = {s: resample_indices(len(r), resamples, params.seed, f"signal/mimic/{s}") for s, r in scored.items()}

    inputs = {"text": mimic.text}
    for name, spec in params.encoders.items():
        enc = encoder(name, spec)
        enc = dataclasses.replace(enc, path=enc.path if enc.path.is_absolute() else ws / enc.path)
        print(f"signal: frozen features of MIMIC images, {name}", flush=True)
        state = load_encoder(enc)
        trunk = resnet50_trunk()
        trunk.load_state_dict(state)
        cfg = dataclasses.replace(ClassifyConfig.from_params(ft.cls, "mimic", 100, precision), mean=enc.mean, std=enc.std)
        inputs[f"image: {enc.label}"] = encode_features(trunk, mimic.images, np.arange(len(mimic.index)), cfg, device,
                                                        progress=False)  # fmt: skip

    print(f"signal: supervised bound, {params.pretrain.epochs} epochs", flush=True)
    state, kinds, losses = train_supervised(ws, params, mimic)
    half = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # the pipeline's normalisation, which the bound trained with
    print("signal: frozen features of MIMIC images, supervised bound", flush=True)
    trunk = resnet50_trunk()
    trunk.load_state_dict(state)
    cfg = dataclasses.replace(ClassifyConfig.from_params(ft.cls, "mimic", 100, precision), mean=half[0], std=half[1])
    inputs["image: supervised bound"] = encode_features(trunk, mimic.images, np.arange(len(mimic.index)), cfg, device,
                                                        progress=False)  # fmt: skip

    print("signal: logistic-regression probes on MIMIC", flush=True)
    probe = {"n_train": len(train), "n": {s: len(r) for s, r in scored.items()}, "text_dim": mimic.text.shape[1],
             "pos": {s: mimic.y[r].sum(0).tolist() for s, r in scored.items()}, "sources": inputs, "auc": {}}  # fmt: skip
    for source, x in inputs.items():
        scores = probe_scores(x, mimic.y, train)
        for s, rows in scored.items():
            probe["auc"][(source, s)] = auc_table(scores[rows], mimic.y[rows], idx[s], level)
        shown = ", ".join(f"{label} {_fmt(a[0])}" for label, a in zip(TARGETS, probe["auc"][(source, 'test')]))
        print(f"signal: {source} on test: {shown}", flush=True)

    print("signal: supervised bound through the cls linear probes", flush=True)
    supervised = evaluate_cls(ws, params, state, *half)
    rows = standing(ws, params, supervised)
    seconds = time.perf_counter() - start
    text = render(ws, params, probe, kinds, losses, rows, seconds)
    out = args.out
    head = DEFAULT_HEADER
    if out.is_file() and MARKER in out.read_text():
        head = out.read_text().split(MARKER)[0] + MARKER + "\n"
    atomic_write(out, head + "\n" + text)
    print(f"signal: wrote {out} ({seconds / 60:.1f} min)")


if __name__ == "__main__":
    main()
