"""embed_text, init_random and pretrain as DVC runs them (torchrun), on the tiny corpus."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mflag.distributed import resolve_precision
from tests.conftest import REPO, run_stage


@pytest.fixture(scope="module")
def pretrained(stage_workdir):
    wd = stage_workdir
    run_stage(wd, sys.executable, str(REPO / "stages/embed_text.py"))
    run_stage(wd, sys.executable, str(REPO / "stages/init_random.py"))
    run_stage(wd, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
              str(REPO / "stages/pretrain.py"))  # fmt: skip
    return wd


def test_embeddings_align_with_the_cache(pretrained):
    index = pd.read_csv(pretrained / "data/cache/mimic/index.csv")
    emb = np.load(pretrained / "data/embeddings/mimic.npy")
    meta = json.loads((pretrained / "data/embeddings/mimic.json").read_text())
    assert emb.shape == (len(index), 384) and emb.dtype == np.float32 and meta["dim"] == 384
    assert np.isfinite(emb).all() and np.abs(emb).sum(axis=1).min() > 0


def test_pretrain_outputs(pretrained):
    m = json.loads((pretrained / "reports/pretrain/metrics.json").read_text())
    for key in ("loss_total", "loss_align", "loss_ortho", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5",
                "t2i_r10", "effective_rank", "mean_abs_offdiag_corr", "params_trainable", "params_frozen"):
        assert np.isfinite(m[key]), key
    assert 0 <= m["i2t_r1"] <= m["i2t_r5"] <= m["i2t_r10"] <= 1
    # parameter counts: the frozen MiniLM (22.7M); ResNet-50 without fc (23,508,032, torchvision's count)
    # plus two projectors Linear -> BN -> ReLU -> Linear -> BN without affine, sized by the params
    assert m["params_frozen"] == 22_713_216
    cfg = yaml.safe_load((pretrained / "params.yaml").read_text())["model"]
    hidden, dim = cfg["proj_hidden"], cfg["proj_dim"]
    def projector(d_in):
        return (d_in + 1) * hidden + 2 * hidden + (hidden + 1) * dim
    assert m["params_trainable"] == 23_508_032 + projector(2048) + projector(384)
    assert m["params_total"] == m["params_trainable"] + m["params_frozen"]
    assert m["trainable_share"] == pytest.approx(m["params_trainable"] / m["params_total"])
    enc = load_file(str(pretrained / "models/mflag/vision_encoder.safetensors"))
    rnd = load_file(str(pretrained / "models/random/vision_encoder.safetensors"))
    assert set(enc) == set(rnd) and "fc.weight" not in enc and "layer4.2.conv3.weight" in enc
    moved = [k for k in enc if enc[k].is_floating_point() and not (enc[k] == rnd[k]).all()]
    assert len(moved) > 100  # pretraining started from the random init (same seed) and moved it
    losses = pd.read_csv(pretrained / "reports/pretrain/losses.csv")
    assert list(losses.columns) == ["step", "epoch", "align", "ortho", "total", "lr"] and len(losses) >= 2
    # the per-step curves DVCLive wrote (dvc.yaml's plots): one TSV per term with the rows of losses.csv,
    # and metrics.json with the last values and step; nothing else in the folder (no dvc.yaml, no report)
    live = pretrained / "reports/pretrain/live"
    assert sorted(str(p.relative_to(live)) for p in live.rglob("*") if p.is_file()) == [
        "metrics.json", *(f"plots/metrics/train/{k}.tsv" for k in ("align", "lr", "ortho", "total"))]
    rows = pd.read_csv(pretrained / "reports/pretrain/losses.csv", dtype=str)
    for k in ("align", "ortho", "total", "lr"):
        expected = f"step\t{k}\n" + "".join(f"{step}\t{v}\n" for step, v in zip(rows["step"], rows[k]))
        assert (live / f"plots/metrics/train/{k}.tsv").read_text() == expected, k
    last = rows.iloc[-1]
    summary = json.loads((live / "metrics.json").read_text())
    assert summary == {"train": {k: float(last[k]) for k in ("align", "ortho", "total", "lr")}, "step": int(last["step"])}
    spectrum = pd.read_csv(pretrained / "reports/pretrain/spectrum.csv")
    assert (np.diff(spectrum["singular_value"]) <= 1e-9).all()
    run = json.loads((pretrained / "models/mflag/run.json").read_text())
    assert run["params"]["loss"]["ortho_weight"] == 1.0
    # run.json holds only params the stage reads: those dvc.yaml declares for it (model.text reaches it
    # through the embeddings), so a change elsewhere in params.yaml cannot change this output
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["pretrain"]["params"]
    top = {k.split(".")[0] for k in declared}
    # world_size, precision_used and seed_used are what the run resolved, not params.yaml keys
    assert set(run["params"]) - {"world_size", "precision_used", "seed_used"} <= top and {"seed", "loss", "pretrain"} <= set(run["params"])
    assert run["params"]["precision_used"] == resolve_precision(run["params"]["pretrain"]["precision"],
                                                                torch.device("cpu"), "pretrain.precision")
    assert set(run["params"]["model"]) >= {"vision", "proj_dim"}
    assert not (pretrained / ".resume/pretrain.pt").exists()  # removed once the run finished


def test_pretrain_seed_replaces_the_top_level_seed(pretrained, tmp_path):
    # The fixture's run: top-level seed 42, pretrain.seed null. Another top-level seed with pretrain.seed
    # 42 must give the very same run (trunk and projector init, data order, augmentation).
    params = yaml.safe_load((pretrained / "params.yaml").read_text())
    assert params["seed"] == 42 and params["pretrain"]["seed"] is None
    wd = tmp_path / "wd"
    shutil.copytree(pretrained, wd, ignore=shutil.ignore_patterns("models", "reports", ".resume"))
    params["seed"], params["pretrain"]["seed"] = 7, 42
    (wd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run_stage(wd, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                     str(REPO / "stages/pretrain.py"))  # fmt: skip
    epochs = params["pretrain"]["epochs"]
    progress = [line for line in proc.stdout.splitlines() if line.startswith("pretrain epoch")]
    assert [line.split(":")[0] for line in progress] == [f"pretrain epoch {e}/{epochs}" for e in range(1, epochs + 1)]
    assert all(" img/s)" in line and " total " in line for line in progress)
    name = "models/mflag/vision_encoder.safetensors"
    assert (wd / name).read_bytes() == (pretrained / name).read_bytes()
    # the curves too, byte for byte (no time stamps in DVCLive's files)
    for path in sorted(p for p in (pretrained / "reports/pretrain/live").rglob("*") if p.is_file()):
        assert (wd / path.relative_to(pretrained)).read_bytes() == path.read_bytes(), path.name
    run = json.loads((wd / "models/mflag/run.json").read_text())["params"]
    assert (run["seed"], run["pretrain"]["seed"], run["seed_used"]) == (7, 42, 42)
