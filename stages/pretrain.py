"""Stage `pretrain`: M-FLAG pretraining of the ResNet-50 encoder (runs under torchrun).

Single process: `torchrun --standalone --nproc_per_node=1 stages/pretrain.py` (what dvc.yaml runs);
several GPUs or nodes: see docs/gpu.md. Only rank 0 writes. A re-run after a kill resumes from the last
finished epoch (.resume/pretrain.pt, outside DVC's outputs so DVC does not delete it) and writes the bytes
an uninterrupted run writes. A non-finite loss stops the run with one line naming the step and the loss
terms, and no outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

from mflag import distributed
from mflag.augment import AugmentSpec
from mflag.config import to_dict
from mflag.io import atomic_write, open_live, rounded, write_json
from mflag.models import MFLAG, VisionInitError, build_trunk, count_parameters, save_trunk
from mflag.params import load_or_exit
from mflag.pretrain import (NonFiniteLoss, TrainConfig, checkpoint_bytes, evaluate, load_data,
                            remove_stale_temporaries, train, write_reports)

CACHE = Path("data/cache/mimic")
EMBEDDINGS = Path("data/embeddings/mimic.npy")
RESUME = Path(".resume/pretrain.pt")
MODELS = Path("models/mflag")  # named after the init key the fine-tunes use
REPORTS = Path("reports/pretrain")
OUTPUTS = (MODELS / "vision_encoder.safetensors", MODELS / "checkpoint.pt", MODELS / "run.json",
           REPORTS / "metrics.json", REPORTS / "losses.csv", REPORTS / "spectrum.csv")  # fmt: skip


def _fingerprint(run_params: dict) -> str:
    """What a resume checkpoint must match: the params this stage reads and its input files."""
    h = hashlib.sha256(json.dumps(run_params, sort_keys=True).encode())
    for path in (CACHE / "index.csv", EMBEDDINGS):
        h.update(hashlib.sha256(path.read_bytes()).digest())
    h.update(str((CACHE / "images.npy").stat().st_size).encode())
    return h.hexdigest()


def main() -> None:
    params = load_or_exit()
    p, env = params.pretrain, distributed.init(params.pretrain.device)
    precision = distributed.resolve_precision(p.precision, env.device, "pretrain.precision")
    meta = json.loads(EMBEDDINGS.with_suffix(".json").read_text())
    seed = p.run_seed(params.seed)
    try:
        trunk = build_trunk(params.model.vision.init, params.model.vision.imagenet_weights, seed)
    except VisionInitError as err:
        sys.exit(f"error: pretrain: {err}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # identical projector init on every rank
        model = MFLAG(trunk, meta["dim"], params.model.proj_hidden, params.model.proj_dim, frozen_stages=p.frozen_stages)
    cfg = TrainConfig(
        epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay, betas=tuple(p.betas),
        restart_fraction=p.restart_fraction, eta_min=p.eta_min, precision=precision, channels_last=p.channels_last,
        workers=p.workers,
        augment=AugmentSpec(crop=p.crop, rotation=tuple(p.rotation), perspective_p=p.perspective_p,
                            perspective_distortion=p.perspective_distortion, autocontrast_p=p.autocontrast_p),
        ortho_weight=params.loss.ortho_weight, ortho_offdiag_weight=params.loss.ortho_offdiag_weight,
        ortho_on=params.loss.ortho_on, seed=seed, log_every=p.log_every,
    )  # fmt: skip
    run_params = {"seed": params.seed, "loss": to_dict(params.loss), "model": to_dict(params.model),
                  "pretrain": to_dict(p), "precision_used": precision, "seed_used": seed,
                  "world_size": env.world_size}  # fmt: skip
    data = load_data(CACHE, EMBEDDINGS)
    live = None
    if env.is_main:
        for path in OUTPUTS:  # what a killed run's atomic writes left (the resume file's: in train)
            remove_stale_temporaries(path)
        live = open_live(REPORTS / "live")  # per-step curves: plots/metrics/train/*.tsv, metrics.json

    def log(rec: dict) -> None:
        live.step = rec["step"]
        for k in ("align", "ortho", "total", "lr"):
            live.log_metric(f"train/{k}", rounded(rec[k]))  # as losses.csv writes them
        live.next_step()

    try:
        history = train(model, data, cfg, env, RESUME, _fingerprint(run_params), log=log if live else None)
    except NonFiniteLoss as err:
        distributed.shutdown(env)
        if not env.is_main:
            sys.exit(1)
        shutil.rmtree(REPORTS / "live", ignore_errors=True)  # the curves so far: no partial outputs
        with contextlib.suppress(OSError):
            REPORTS.rmdir()  # where it is empty now
        sys.exit(f"error: pretrain: {err}")
    if env.is_main:
        metrics, spectrum = evaluate(model, data, p.crop, p.eval_batch_size, env.device)
        n_trunk, n_proj = count_parameters(model.encoder), count_parameters(model.proj_img) + count_parameters(model.proj_txt)
        trainable, frozen = n_trunk + n_proj, int(meta["lm_parameters"])
        last = history["epoch"][-1]
        report = {
            "loss_total": last["total"], "loss_align": last["align"], "loss_ortho": last["ortho"], **metrics,
            "params_total": trainable + frozen, "params_trainable": trainable, "params_frozen": frozen,
            "trainable_share": trainable / (trainable + frozen), "parameter_reduction": frozen / (trainable + frozen),
        }  # fmt: skip
        save_trunk(model.encoder, MODELS / "vision_encoder.safetensors", init="mflag")
        atomic_write(MODELS / "checkpoint.pt", checkpoint_bytes(model, history, run_params))
        # only the params this run reads (as dvc.yaml declares them, plus model.text through the
        # embeddings): with all of params.yaml, an unrelated edit would change this output on the next run
        write_json(MODELS / "run.json", {"params": run_params, "text_model": meta})
        write_reports(REPORTS, report, history, spectrum)
        live.end()
        RESUME.unlink(missing_ok=True)
        print(json.dumps(report, indent=1))
    distributed.barrier(env)
    distributed.shutdown(env)


if __name__ == "__main__":
    main()
