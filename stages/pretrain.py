"""Stage `pretrain`: M-FLAG pretraining of the ResNet-50 encoder, or the ConVIRT-style baseline (runs under torchrun).

`torchrun --nnodes=1 --nproc_per_node=1 --rdzv_backend=c10d --rdzv_endpoint=localhost:0 --rdzv_id=mflag
stages/pretrain.py [mflag|convirt]` (default mflag): what dvc.yaml runs, torchrun's options from the `pretrain`
params; `python stages/pretrain.py` runs one process. Several GPUs or nodes: docs/gpu.md, docs/scale-out.md.
Both methods share the trunk init, the data order, the augmentation, the optimiser and the schedule
(`pretrain`); they differ in the objective (M-FLAG: alignment + orthogonality; ConVIRT: symmetric InfoNCE)
and the text side: M-FLAG reads the cached frozen-LM embeddings (stage embed_text) unless
`mflag.text_free_layers` > 0; ConVIRT trains the LM's top `convirt.text_free_layers` layers. Where layers
train, the LM is loaded here, its frozen lower layers run once over the reports, and only the top layers run
at each step.

Only rank 0 writes. A re-run after a kill resumes from the last finished epoch (.resume/pretrain.pt or
.resume/pretrain_convirt.pt, outside DVC's outputs so DVC does not delete it) and writes the bytes an
uninterrupted run writes; only timing.json (throughput) differs between runs. A non-finite loss stops
the run with one line naming the step and the loss terms, and no outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mflag import distributed
from mflag.augment import AugmentSpec
from mflag.config import to_dict
from mflag.io import atomic_write, open_live, rounded, write_json
from mflag.models import MFLAG, VisionInitError, build_trunk, count_parameters, save_trunk
from mflag.params import LAUNCH_KEYS, load_or_exit
from mflag.pretrain import (LOSS_TERMS, NonFiniteLoss, TrainConfig, checkpoint_bytes, evaluate, load_data,
                            remove_stale_temporaries, train, with_report_states, write_reports)
from mflag.text import TextModelError, TextTower, load_frozen_lm, lm_layers

CACHE = Path("data/cache/mimic")
EMBEDDINGS = Path("data/embeddings/mimic.npy")
USAGE = "usage: stages/pretrain.py [mflag|convirt]"


@dataclass(frozen=True)
class Method:
    models: Path  # named after the init key the fine-tunes use
    reports: Path
    resume: Path

    @property
    def outputs(self) -> tuple[Path, ...]:
        models = ("vision_encoder.safetensors", "checkpoint.pt", "run.json")
        reports = ("metrics.json", "losses.csv", "spectrum.csv", "timing.json")
        return (*(self.models / name for name in models), *(self.reports / name for name in reports))


METHODS = {
    "mflag": Method(Path("models/mflag"), Path("reports/pretrain"), Path(".resume/pretrain.pt")),
    "convirt": Method(Path("models/convirt"), Path("reports/pretrain_convirt"), Path(".resume/pretrain_convirt.pt")),
}


def _fingerprint(run_params: dict, inputs: tuple[Path, ...]) -> str:
    """What a resume checkpoint must match: the params this stage reads and its input files."""
    h = hashlib.sha256(json.dumps(run_params, sort_keys=True).encode())
    for path in inputs:
        h.update(hashlib.sha256(path.read_bytes()).digest())
    h.update(str((CACHE / "images.npy").stat().st_size).encode())
    return h.hexdigest()


def main(argv: list[str]) -> None:
    if len(argv) > 1 or (argv and argv[0] not in METHODS):
        sys.exit(f"error: pretrain: {USAGE} (got {' '.join(argv)!r})")
    method = argv[0] if argv else "mflag"
    out = METHODS[method]
    params = load_or_exit()
    p, env = params.pretrain, distributed.init(params.pretrain.device)
    try:
        distributed.check_world(env, p.nnodes, p.nproc)
    except distributed.WorldMismatch as err:
        sys.exit(f"error: pretrain: {err}")
    precision = distributed.resolve_precision(p.precision, env.device, "pretrain.precision")
    seed = p.run_seed(params.seed)
    free = params.mflag.text_free_layers if method == "mflag" else params.convirt.text_free_layers
    text = params.model.text

    # the text side: the cached embeddings (nothing of the LM trains), or the LM's top `free` layers as a
    # tower over token states of its frozen lower layers, computed here once
    tower, precompute_seconds = None, 0.0
    if free == 0:
        data = load_data(CACHE, EMBEDDINGS)
        text_model = json.loads(EMBEDDINGS.with_suffix(".json").read_text())
        text_dim, lm_parameters = text_model["dim"], int(text_model["lm_parameters"])
    else:
        try:
            enc = load_frozen_lm(text.name_or_path, text.trust_remote_code, str(env.device), revision=text.revision)
            tower = TextTower(enc, free, text.pooling, key=f"{method}.text_free_layers")
        except TextModelError as err:
            sys.exit(f"error: pretrain: {err}")
        start = time.perf_counter()
        data = with_report_states(load_data(CACHE, None), enc, free, text.max_length, text.batch_size, env.device)
        precompute_seconds = time.perf_counter() - start
        text_dim, lm_parameters = enc.dim, enc.n_params
        text_model = {"name_or_path": text.name_or_path, "revision": text.revision, "dim": enc.dim,
                      "lm_parameters": enc.n_params, "layers": len(lm_layers(enc)), "free_layers": free,
                      "pooling": text.pooling, "max_length": text.max_length}  # fmt: skip
    try:
        trunk = build_trunk(params.model.vision.init, params.model.vision.imagenet_weights, seed)
    except VisionInitError as err:
        sys.exit(f"error: pretrain: {err}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # identical projector init on every rank, and for both methods
        model = MFLAG(trunk, text_dim, params.model.proj_hidden, params.model.proj_dim, frozen_stages=p.frozen_stages,
                      text_tower=tower)  # fmt: skip
    objective = (
        {"objective": "mflag", "ortho_weight": params.loss.ortho_weight,
         "ortho_offdiag_weight": params.loss.ortho_offdiag_weight, "ortho_on": params.loss.ortho_on}
        if method == "mflag" else {"objective": "convirt", "temperature": params.convirt.temperature}
    )  # fmt: skip
    cfg = TrainConfig(
        epochs=p.epochs, batch_size=p.batch_size, lr=p.lr if method == "mflag" else params.convirt.lr, weight_decay=p.weight_decay, betas=tuple(p.betas),
        restart_fraction=p.restart_fraction, eta_min=p.eta_min, precision=precision, channels_last=p.channels_last,
        workers=p.workers,
        augment=AugmentSpec(crop=p.crop, rotation=tuple(p.rotation), perspective_p=p.perspective_p,
                            perspective_distortion=p.perspective_distortion, autocontrast_p=p.autocontrast_p),
        seed=seed, log_every=p.log_every, **objective,
    )  # fmt: skip
    # only the params this run reads, in the order they always had; mflag.text_free_layers only where it is
    # not the paper's 0, so that the paper's run keeps the bytes (and DVC hashes) it had before the key existed
    run_params = {"seed": params.seed}
    if method == "mflag":
        run_params["loss"] = to_dict(params.loss)
        if free:
            run_params["mflag"] = to_dict(params.mflag)
    else:
        run_params["convirt"] = to_dict(params.convirt)
    # not the launch keys (nodes, rendezvous): where the processes meet changes nothing they compute, and a run
    # moved to other nodes (a requeued job) still resumes; the world size they make is `world_size`
    pretrain = {k: v for k, v in to_dict(p).items() if k not in LAUNCH_KEYS}
    run_params |= {"model": to_dict(params.model), "pretrain": pretrain, "precision_used": precision,
                   "seed_used": seed, "world_size": env.world_size}  # fmt: skip
    inputs = (CACHE / "index.csv", EMBEDDINGS) if free == 0 else (CACHE / "index.csv",)
    live = None
    if env.is_main:
        for path in out.outputs:  # what a killed run's atomic writes left (the resume file's: in train)
            remove_stale_temporaries(path)
        live = open_live(out.reports / "live")  # per-step curves: plots/metrics/train/*.tsv, metrics.json
    curves = (*LOSS_TERMS[cfg.objective], "lr")

    def log(rec: dict) -> None:
        live.step = rec["step"]
        for k in curves:
            live.log_metric(f"train/{k}", rounded(rec[k]))  # as losses.csv writes them
        live.next_step()

    throughput: dict = {}
    try:
        history = train(model, data, cfg, env, out.resume, _fingerprint(run_params, inputs), log=log if live else None,
                        throughput=throughput)  # fmt: skip
    except NonFiniteLoss as err:
        distributed.shutdown(env)
        if not env.is_main:
            sys.exit(1)
        shutil.rmtree(out.reports / "live", ignore_errors=True)  # the curves so far: no partial outputs
        with contextlib.suppress(OSError):
            out.reports.rmdir()  # where it is empty now
        sys.exit(f"error: pretrain: {err}")
    if env.is_main:
        metrics, spectrum = evaluate(model, data, p.crop, p.eval_batch_size, env.device)
        n_proj = count_parameters(model.proj_img) + count_parameters(model.proj_txt)
        n_tower = count_parameters(tower) if tower is not None else 0
        trainable, frozen = count_parameters(model.encoder) + n_proj + n_tower, lm_parameters - n_tower
        last = history["epoch"][-1]
        report = {
            "loss_total": last["total"], **{f"loss_{k}": last[k] for k in LOSS_TERMS[cfg.objective][:-1]}, **metrics,
            "params_total": trainable + frozen, "params_trainable": trainable, "params_frozen": frozen,
            "trainable_share": trainable / (trainable + frozen), "parameter_reduction": frozen / (trainable + frozen),
        }  # fmt: skip
        save_trunk(model.encoder, out.models / "vision_encoder.safetensors", init=method)
        atomic_write(out.models / "checkpoint.pt", checkpoint_bytes(model, history, run_params))
        # only the params this run reads (as dvc.yaml declares them, plus model.text through the
        # embeddings or the LM): with all of params.yaml, an unrelated edit would change this output
        write_json(out.models / "run.json", {"params": run_params, "text_model": text_model})
        write_reports(out.reports, report, history, spectrum)
        seconds = throughput["seconds"]
        # the one output that differs between identical runs (docs/determinism.md)
        write_json(out.reports / "timing.json", {
            "images_per_second": throughput["images"] / seconds if seconds > 0 else None, "seconds": seconds,
            "images": throughput["images"], "text_precompute_seconds": precompute_seconds, "precision": precision,
            "device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu",
            "world_size": env.world_size,
        })  # fmt: skip
        live.end()
        out.resume.unlink(missing_ok=True)
        print(json.dumps(report, indent=1))
    distributed.barrier(env)
    distributed.shutdown(env)


if __name__ == "__main__":
    main(sys.argv[1:])
