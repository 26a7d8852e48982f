"""The pretraining loop: AMP, DDP, exact resume, for two objectives (`TrainConfig.objective`):
M-FLAG's alignment + orthogonality, and the ConVIRT baseline's symmetric InfoNCE.

Data: the mimic uint8 cache (N, S, S) and, row-aligned, either the cached frozen-LM report embeddings
(N, D) or, where the LM's top layers train, each report's cached lower-layer token states
(with_report_states; the model's text tower runs the top layers). Every epoch draws one permutation from
(seed, epoch), shared by all ranks; a global batch of world x batch_size rows is cut into per-rank slices
(drop_last, as the reference). Augmentation runs on whole batches on the training device, drawing from
(seed, rank, epoch); so does the text tower's dropout. Batch norm, the orthogonality term and InfoNCE's
negatives are per rank, as in the reference (DDP averages the gradients).

A resume checkpoint is written atomically after every epoch; a re-run finds it and continues from
the last finished epoch, reaching the same weights as an uninterrupted run (bit for bit on CPU). It holds
only tensors, plain containers, numbers and JSON text, so it is read with ``torch.load(weights_only=True)``:
a file that cannot be read that way, or that belongs to another run, is ignored with a warning. A
non-finite loss stops the run at once (:class:`NonFiniteLoss`).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import queue
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from mflag.augment import AugmentSpec, augment_batch, center_crop_normalize
from mflag.distributed import DistEnv, mean_across
from mflag.io import atomic_write, rounded, write_json
from mflag.losses import alignment_loss, info_nce_loss, orthogonality_loss
from mflag.models import MFLAG
from mflag.text import FrozenTextEncoder, TokenStates, lower_layer_states


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int  # per rank
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    restart_fraction: float  # T_0 of the warm restarts as a share of all steps (reference: 0.4)
    eta_min: float
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    workers: int  # background threads that gather batches ahead of the step
    augment: AugmentSpec
    seed: int
    log_every: int
    objective: str = "mflag"  # mflag | convirt
    # mflag: align + ortho_weight x orthogonality
    ortho_weight: float | None = None
    ortho_offdiag_weight: float | None = None
    ortho_on: str | None = None  # backbone | projection
    # convirt: symmetric InfoNCE
    temperature: float | None = None

    def __post_init__(self) -> None:
        needs = OBJECTIVE_PARAMS.get(self.objective)
        if needs is None:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVE_PARAMS)}, got {self.objective!r}")
        missing = [k for k in needs if getattr(self, k) is None]
        if missing:
            raise ValueError(f"objective {self.objective} needs {', '.join(missing)}")


OBJECTIVE_PARAMS = {"mflag": ("ortho_weight", "ortho_offdiag_weight", "ortho_on"), "convirt": ("temperature",)}
LOSS_TERMS = {"mflag": ("align", "ortho", "total"), "convirt": ("infonce", "total")}  # "total" is what trains


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite; the message names the epoch, the step and every term."""


def step_keys(objective: str) -> tuple[str, ...]:
    """The keys of a record of history["step"], and the columns of losses.csv."""
    return ("step", "epoch", *LOSS_TERMS[objective], "lr")


def epoch_keys(objective: str) -> tuple[str, ...]:
    """The keys of a record of history["epoch"]."""
    return ("epoch", *LOSS_TERMS[objective], "lr")


@dataclass
class ReportStates:
    """The text tower's input of every row: the lower-layer token states of each distinct report, held once."""

    states: list[torch.Tensor]  # per distinct report: (T_j, D) float32
    report_of_row: np.ndarray  # (N,) index into `states`; -1 for a row the run does not use

    def batch(self, rows: np.ndarray) -> TokenStates:
        return TokenStates.pad([self.states[j] for j in self.report_of_row[rows]])


@dataclass
class PretrainData:
    images: np.ndarray  # (N, S, S) uint8, memory-mapped
    text_emb: np.ndarray | None  # (N, D) float32 cached LM embeddings; None where report_states is the text input
    train_idx: np.ndarray
    valid_idx: np.ndarray
    texts: list[str]  # report text per row (valid positives: identical text)
    report_states: ReportStates | None = None


def load_data(cache_dir: Path, embeddings: Path | None) -> PretrainData:
    """The mimic cache and, unless `embeddings` is None (a text tower reads the reports instead:
    with_report_states), the cached LM embeddings."""
    index = pd.read_csv(cache_dir / "index.csv", dtype=str, keep_default_na=False)
    images = np.load(cache_dir / "images.npy", mmap_mode="r")
    emb = None if embeddings is None else np.load(embeddings)
    if len(index) != len(images) or (emb is not None and len(emb) != len(images)):
        raise ValueError(
            f"{cache_dir}: index.csv ({len(index)} rows), images.npy ({len(images)})"
            + ("" if emb is None else f" and {embeddings} ({len(emb)})")
            + " must be row-aligned; re-run preprocess" + ("" if emb is None else " and embed_text")
        )
    split = index["split"].to_numpy()
    return PretrainData(
        images=images,
        text_emb=None if emb is None else emb.astype(np.float32, copy=False),
        train_idx=np.flatnonzero(split == "train"),
        valid_idx=np.flatnonzero(split == "valid"),
        texts=index["text"].tolist(),
    )


def with_report_states(
    data: PretrainData, enc: FrozenTextEncoder, free_layers: int, max_length: int, batch_size: int, device
) -> PretrainData:
    """`data` with the lower-layer token states (all but the top `free_layers` layers of `enc`) of the
    distinct reports of the train and valid rows, computed once: frozen layers give a report the same
    states at every step."""
    report_of_row = np.full(len(data.texts), -1, dtype=np.int64)
    distinct: dict[str, int] = {}
    for i in np.concatenate([data.train_idx, data.valid_idx]):
        report_of_row[i] = distinct.setdefault(data.texts[i], len(distinct))
    states = lower_layer_states(enc, list(distinct), free_layers, max_length, batch_size, device=str(device))
    return dataclasses.replace(data, report_states=ReportStates(states, report_of_row))


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") & (2**63 - 1)


def steps_per_epoch(n_train: int, batch_size: int, world: int) -> int:
    return n_train // (batch_size * world)


def epoch_batches(data: PretrainData, cfg: TrainConfig, epoch: int, env: DistEnv) -> list[np.ndarray]:
    """This rank's row indices for every step of `epoch`."""
    g = torch.Generator().manual_seed(_seed(cfg.seed, "order", epoch))
    perm = data.train_idx[torch.randperm(len(data.train_idx), generator=g).numpy()]
    per_step = cfg.batch_size * env.world_size
    out = []
    for s in range(steps_per_epoch(len(perm), cfg.batch_size, env.world_size)):
        lo = s * per_step + env.rank * cfg.batch_size
        out.append(perm[lo : lo + cfg.batch_size])
    return out


def text_inputs(data: PretrainData, rows: np.ndarray):
    """The model's text input for `rows`: cached embeddings (B, D), or the text tower's TokenStates."""
    if data.report_states is not None:
        return data.report_states.batch(rows)
    return torch.from_numpy(data.text_emb[rows])


def _gather(data: PretrainData, rows: np.ndarray) -> tuple:
    return torch.from_numpy(np.ascontiguousarray(data.images[rows])), text_inputs(data, rows)


def batch_stream(data: PretrainData, batches: list[np.ndarray], workers: int, pin: bool) -> Iterator:
    """(uint8 images, text inputs) per step; `workers` threads read ahead from the memory map."""
    if workers <= 0:
        for rows in batches:
            yield _gather(data, rows)
        return
    stop = threading.Event()

    def produce(start: int) -> None:
        # thread k fills steps k, k + workers, ...; the consumer takes them back in order
        for i in range(start, len(batches), workers):
            if stop.is_set():
                return
            img, txt = _gather(data, batches[i])
            if pin:
                img, txt = img.pin_memory(), txt.pin_memory()
            slot[i].put((img, txt))

    slot = [queue.Queue(maxsize=1) for _ in batches]
    threads = [threading.Thread(target=produce, args=(k,), daemon=True) for k in range(workers)]
    for t in threads:
        t.start()
    try:
        for i in range(len(batches)):
            yield slot[i].get()
    finally:
        stop.set()


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def compute_losses(model: nn.Module, images: torch.Tensor, text, cfg: TrainConfig) -> dict:
    """Forward one (per-rank) batch and return the objective's named loss terms and their weighted sum."""
    out = model(images, text)
    if cfg.objective == "convirt":
        l_nce = info_nce_loss(out.z_img, out.z_txt, cfg.temperature)
        return {"infonce": l_nce, "total": l_nce}
    l_align = alignment_loss(out.z_img, out.z_txt)
    feats = out.h_img if cfg.ortho_on == "backbone" else out.z_img
    l_ortho = orthogonality_loss(feats, cfg.ortho_offdiag_weight)
    return {"align": l_align, "ortho": l_ortho, "total": l_align + cfg.ortho_weight * l_ortho}


def train_step(model, opt, scaler, images: torch.Tensor, text, cfg: TrainConfig, dtype) -> dict:
    """One optimiser step on one (per-rank) batch, under autocast when `dtype` is set."""
    with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        losses = compute_losses(model, images, text, cfg)
    opt.zero_grad(set_to_none=True)
    scaler.scale(losses["total"]).backward()
    scaler.step(opt)
    scaler.update()
    return losses


def make_optimizer(model: nn.Module, cfg: TrainConfig, total_steps: int):
    # foreach: one multi-tensor kernel per update op over all parameters. PyTorch picks it by default on CUDA
    # only; on the CPU its per-tensor loop cost ~8x as much per step, for bit-identical updates (the fine-tune
    # heads' optimisers set it for the same reason)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, foreach=True)
    t0 = max(1, int(cfg.restart_fraction * total_steps))
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=t0, T_mult=1, eta_min=cfg.eta_min)
    return opt, sched


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporary files that a killed writer of `path` left (``.<name>.tmp<pid>``, also
    mflag.io.atomic_write's); returns them. Call it before anything writes `path` (DVC runs one
    stage at a time, so no other writer is live)."""
    stale = sorted(path.parent.glob(f".{path.name}.tmp*")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def _warn(message: str) -> None:
    print(f"warning: pretrain: {message}", file=sys.stderr, flush=True)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_history(history, epoch: int, objective: str) -> None:
    """The layout :func:`train` writes: `epoch` epoch records and their step records, numbers only."""
    if not isinstance(history, dict) or set(history) != {"step", "epoch"}:
        raise ValueError("its history is not {step: [...], epoch: [...]}")
    for name, keys in (("step", step_keys(objective)), ("epoch", epoch_keys(objective))):
        recs = history[name]
        if not isinstance(recs, list) or not all(
            isinstance(r, dict) and set(r) == set(keys) and all(_is_number(v) for v in r.values()) for r in recs
        ):  # fmt: skip
            raise ValueError(f"its {name} history holds records other than {{{', '.join(keys)}}} with numbers")
    if [r["epoch"] for r in history["epoch"]] != list(range(1, epoch + 1)):
        raise ValueError(f"its history does not list epochs 1 to {epoch}")


def _check_model_state(state, model: nn.Module) -> None:
    mine = model.state_dict()
    if not isinstance(state, dict) or list(state) != list(mine):
        raise ValueError("its model weights are not this model's")
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) or v.shape != mine[k].shape or v.dtype != mine[k].dtype:
            raise ValueError(f"its model weight {k} is not a {mine[k].dtype} tensor of shape {tuple(mine[k].shape)}")


def _resume(path: Path, fingerprint: str, model, opt, sched, scaler, cfg: TrainConfig, announce: bool):
    """(history, finished epochs) from the resume checkpoint at `path`, loaded into the model, optimiser,
    scheduler and scaler; None (everything left as it was) where there is none to use.

    The file is read with weights_only=True, so a hostile pickle runs no code and fails to load; such a
    file, a corrupt one, one from another run (fingerprint) and one whose contents do not fit this run
    are ignored with a warning that names the file. Nothing is applied before all of it is checked."""
    if not path.is_file():
        return None

    def skip(why: str) -> None:
        if announce:
            _warn(f"ignoring the resume checkpoint {path}: {why}; training starts from scratch")

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's weights-only unpickler refused an opcode or a global
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?:\.\s|\.?\n|$)", str(err))
        return skip(
            "its pickle holds something other than tensors, numbers and plain containers"
            f"{f' ({detail.group(1)})' if detail else ''}, or is corrupt; it was not unpickled"
        )
    except Exception as err:  # noqa: BLE001 -- a corrupt or truncated file: whatever it holds, it is not used
        return skip(f"it cannot be read ({type(err).__name__}: {str(err).split('. ')[0][:200] or 'empty file'})")
    if not isinstance(ckpt, dict):
        return skip("it is not a resume checkpoint")
    if ckpt.get("fingerprint") != fingerprint:
        return skip("it was written by a run with other params or other inputs")
    try:
        epoch = ckpt["epoch"]
        if not isinstance(epoch, int) or isinstance(epoch, bool) or not 1 <= epoch <= cfg.epochs:
            raise ValueError(f"its epoch {epoch!r} is not 1 to {cfg.epochs}")
        history = json.loads(ckpt["history"])
        _check_history(history, epoch, cfg.objective)
        _check_model_state(ckpt["model"], model)
        for name, obj in (("scheduler", sched), ("scaler", scaler)):
            if not isinstance(ckpt[name], dict) or set(ckpt[name]) != set(obj.state_dict()):
                raise ValueError(f"its {name} state is not this run's")
    except (KeyError, TypeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        return skip(f"its contents do not fit this run ({type(err).__name__}: {err})")
    fresh = [copy.deepcopy(o.state_dict()) for o in (opt, sched, scaler)]
    try:
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
    except Exception as err:  # noqa: BLE001 -- put back the fresh states and start over
        for o, state in zip((opt, sched, scaler), fresh):
            o.load_state_dict(state)
        return skip(f"its optimiser state does not fit this run ({type(err).__name__}: {err})")
    model.load_state_dict(ckpt["model"])  # checked above: same keys, shapes and dtypes
    return history, epoch


def _raise_non_finite(vals: torch.Tensor, terms: tuple[str, ...], epoch: int, step: int) -> None:
    shown = " ".join(f"{k}={v:.4g}" for k, v in zip(terms, vals.tolist()))
    raise NonFiniteLoss(f"non-finite loss at epoch {epoch} step {step}: {shown}")


def _seed_device_rng(device: torch.device, seed: int) -> None:
    """Seed the global generator that kernels on `device` draw from (only that one)."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        torch.cuda.default_generators[index].manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def train(
    model: MFLAG,
    data: PretrainData,
    cfg: TrainConfig,
    env: DistEnv,
    resume_path: Path,
    fingerprint: str,
    log: Callable[[dict], None] | None = None,
    progress: bool = True,
    stop_after_epoch: int | None = None,
    throughput: dict | None = None,
) -> dict:
    """Train `model` in place; returns the history. `stop_after_epoch` simulates a kill (tests).
    `throughput`, where given, receives the images and seconds of the epochs this call ran (all ranks)."""
    device = env.device
    model.to(device)
    if cfg.channels_last:  # also on CPU: oneDNN's fast convolution kernels want NHWC
        model.to(memory_format=torch.channels_last)
    n_steps = steps_per_epoch(len(data.train_idx), cfg.batch_size, env.world_size)
    if n_steps == 0:
        raise ValueError(
            f"pretrain: {len(data.train_idx)} training images cannot fill one step of "
            f"{cfg.batch_size} x {env.world_size} ranks; lower pretrain.batch_size"
        )
    opt, sched = make_optimizer(model, cfg, cfg.epochs * n_steps)
    dtype = autocast_dtype(cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    terms = LOSS_TERMS[cfg.objective]
    history: dict = {"step": [], "epoch": []}
    start_epoch = 0
    if env.is_main:
        for tmp in remove_stale_temporaries(resume_path):
            print(f"pretrain: removed {tmp}, left by a killed run")
    resumed = _resume(resume_path, fingerprint, model, opt, sched, scaler, cfg, announce=env.is_main)
    if resumed is not None:
        history, start_epoch = resumed
        if env.is_main:
            print(f"pretrain: resuming after epoch {start_epoch} from {resume_path}")
            for rec in history["step"] if log else ():
                log(rec)  # the logger starts empty: replay what the killed run had logged
    ddp = model
    if env.distributed:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step = start_epoch * n_steps
    total_seconds, total_images = 0.0, 0
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        aug_gen = torch.Generator().manual_seed(_seed(cfg.seed, "augment", env.rank, epoch))
        sums = torch.zeros(len(terms), dtype=torch.float64)
        t0, seen = time.perf_counter(), 0
        batches = epoch_batches(data, cfg, epoch, env)
        stream = batch_stream(data, batches, cfg.workers, pin=device.type == "cuda")
        bar = None
        if progress and env.is_main:
            from tqdm import tqdm

            bar = tqdm(total=n_steps, desc=f"pretrain epoch {epoch + 1}/{cfg.epochs}", leave=False)
        # dropout (the text tower's) draws from the global generator: seeded per (rank, epoch), so that a
        # resumed run draws what an uninterrupted one did; restored afterwards
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _seed_device_rng(device, _seed(cfg.seed, "dropout", env.rank, epoch))
            for img_u8, txt in stream:
                img_u8, txt = img_u8.to(device, non_blocking=True), txt.to(device, non_blocking=True)
                images = augment_batch(img_u8, cfg.augment, aug_gen)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                losses = train_step(ddp, opt, scaler, images, txt, cfg, dtype)
                lr = opt.param_groups[0]["lr"]
                sched.step()
                step += 1
                seen += len(img_u8)
                vals = torch.stack([losses[k].detach().double().cpu() for k in terms])
                sums += vals
                # every step, on every rank alike (a rank's NaN reaches all ranks' means): a non-finite loss
                # stops the run before anything is logged or saved from it
                vals = mean_across(vals, env)
                if not torch.isfinite(vals).all():
                    stream.close()
                    if bar is not None:
                        bar.close()
                    _raise_non_finite(vals, terms, epoch + 1, step)
                if step % cfg.log_every == 0 or step == (epoch + 1) * n_steps:
                    rec = {"step": step, "epoch": epoch + 1, **dict(zip(terms, vals.tolist())), "lr": lr}
                    history["step"].append(rec)
                    if log and env.is_main:
                        log(rec)
                if bar is not None:
                    bar.update()
                    bar.set_postfix(loss=f"{vals[-1].item():.3f}")
        if bar is not None:
            bar.close()
        means = mean_across(sums / n_steps, env)
        seconds = time.perf_counter() - t0
        total_seconds, total_images = total_seconds + seconds, total_images + seen * env.world_size
        rec = {"epoch": epoch + 1, **dict(zip(terms, means.tolist())), "lr": opt.param_groups[0]["lr"]}
        # throughput is printed (and handed to `throughput`), never stored: a timing in the checkpoint would
        # make its bytes (and dvc.lock) differ between identical runs
        history["epoch"].append(rec)
        if env.is_main:
            shown = " ".join(f"{k} {rec[k]:.4f}" for k in ("total", *terms[:-1]))
            print(
                f"pretrain epoch {epoch + 1}/{cfg.epochs}: {shown} lr {rec['lr']:.3g} "
                f"({seconds:.1f} s, {seen * env.world_size / seconds:.1f} img/s)",
                flush=True,
            )
            # tensors, numbers and plain containers only, for torch.load(weights_only=True); the history
            # and the config as JSON text
            _atomic_save(
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "scaler": scaler.state_dict(), "epoch": epoch + 1, "history": json.dumps(history),
                 "fingerprint": fingerprint, "config": json.dumps(asdict(cfg))},
                resume_path,
            )  # fmt: skip
        if env.distributed:
            torch.distributed.barrier()  # no rank runs ahead of the checkpoint
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    if throughput is not None:
        throughput.update(images=total_images, seconds=total_seconds)
    return history


@torch.no_grad()
def embed_images(model: MFLAG, images: np.ndarray, rows: np.ndarray, crop: int, batch_size: int, device) -> tuple:
    """(h_img, z_img) for `rows`, centre-cropped, eval mode."""
    model.eval()
    hs, zs = [], []
    for lo in range(0, len(rows), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[rows[lo : lo + batch_size]])).to(device)
        h, z = model.encode_image(center_crop_normalize(x, crop))
        hs.append(h.float().cpu())
        zs.append(z.float().cpu())
    return torch.cat(hs).numpy(), torch.cat(zs).numpy()


@torch.no_grad()
def embed_texts(model: MFLAG, data: PretrainData, rows: np.ndarray, batch_size: int, device) -> np.ndarray:
    """z_txt for `rows`, eval mode. Cached embeddings go in one batch (as they always did: the reports'
    bytes stay); token states `batch_size` rows at a time (each batch padded to its longest report)."""
    model.eval()
    step = batch_size if data.report_states is not None else max(1, len(rows))
    zs = [model.encode_text(text_inputs(data, rows[lo : lo + step]).to(device)).float().cpu()
          for lo in range(0, len(rows), step)]  # fmt: skip
    return torch.cat(zs).numpy()


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """The learning rate of step `step` under cosine annealing with warm restarts (for tests and plots)."""
    t0 = max(1, int(cfg.restart_fraction * total_steps))
    t = step % t0
    return cfg.eta_min + (cfg.lr - cfg.eta_min) * (1 + math.cos(math.pi * t / t0)) / 2


def evaluate(model: MFLAG, data: PretrainData, crop: int, batch_size: int, device) -> tuple[dict, np.ndarray]:
    """Retrieval R@1/5/10 both ways and the geometry of the 2048-d features on the valid rows.

    A report shared by several images of a study is one text: every image with an identical text is a
    correct match. Returns (metrics, singular values of the centred features).
    """
    from mflag.geometry import cosine_similarity, effective_rank, mean_abs_offdiag_correlation, recall_at_k
    from mflag.geometry import singular_values

    rows = data.valid_idx
    h, z_img = embed_images(model, data.images, rows, crop, batch_size, device)
    z_txt = embed_texts(model, data, rows, batch_size, device)
    texts = np.array([data.texts[i] for i in rows], dtype=object)
    positives = texts[:, None] == texts[None, :]
    sim = cosine_similarity(z_img, z_txt)
    i2t, t2i = recall_at_k(sim, positives), recall_at_k(sim.T, positives.T)
    metrics = {f"i2t_r{k}": v for k, v in i2t.items()} | {f"t2i_r{k}": v for k, v in t2i.items()}
    metrics |= {
        "effective_rank": effective_rank(h),
        "mean_abs_offdiag_corr": mean_abs_offdiag_correlation(h),
        "valid_images": int(len(rows)),
    }
    # undefined on collapsed features: null, with the reason (JSON has no NaN)
    reasons = {
        "effective_rank": "the valid images' features are all equal",
        "mean_abs_offdiag_corr": "fewer than two feature dimensions vary over the valid images",
    }
    undefined = {k: why for k, why in reasons.items() if not math.isfinite(metrics[k])}
    if undefined:
        metrics |= {k: None for k in undefined} | {"not_evaluable": undefined}
    return metrics, singular_values(h)


def checkpoint_bytes(model: nn.Module, history: dict, run_params: dict) -> bytes:
    """models/mflag/checkpoint.pt: ``torch.save`` of {"model": state dict, "history", "params"}, readable
    with ``torch.load(weights_only=True)``.

    Canonical, so that a resumed run writes the bytes an uninterrupted one does: the pickle refers back
    to a string it has already written when it meets the same *object* again, so the same content with
    other object identities pickles differently (a resumed run's history was read back from the resume
    file; an uninterrupted run's shares its key strings with the params). The history and params are
    therefore rebuilt by one JSON round trip (identities then follow from the content alone), and the
    tensors are contiguous copies, each with a storage of its own, in the state dict's order.
    """
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = json.loads(json.dumps({"history": history, "params": run_params}, allow_nan=False))
    buf = io.BytesIO()
    torch.save({"model": state, "history": meta["history"], "params": meta["params"]}, buf)
    return buf.getvalue()


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_reports(folder: Path, report: dict, history: dict, spectrum: np.ndarray) -> None:
    """`folder`/metrics.json, losses.csv and spectrum.csv, every float rounded by mflag.io.rounded, so
    that last-bit differences (another BLAS path, another summation order) leave their bytes alone.
    losses.csv has the step records' columns (step_keys of the run's objective)."""
    write_json(folder / "metrics.json", rounded(report))
    atomic_write(folder / "losses.csv", _csv([rounded(r) for r in history["step"]]))
    rows = [{"index": i, "singular_value": rounded(float(s))} for i, s in enumerate(spectrum)]
    atomic_write(folder / "spectrum.csv", _csv(rows))
