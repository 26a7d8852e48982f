"""embed_text, init_random and pretrain as DVC runs them (torchrun), on the tiny corpus."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mflag.distributed import resolve_precision
from mflag.io import rounded
from tests.conftest import REPO, run_stage

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(REPO / "stages/pretrain.py"))
OUTPUTS = ("models/mflag", "reports/pretrain")


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
    assert m == rounded(m)  # 10 significant digits: last-bit noise does not reach the file
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
    # the paper's frozen LM (mflag.text_free_layers 0): no trace of the key in what the run recorded
    assert "mflag" not in run["params"] and "free_layers" not in run["text_model"]
    timing = json.loads((pretrained / "reports/pretrain/timing.json").read_text())
    assert timing["images_per_second"] > 0 and timing["text_precompute_seconds"] == 0
    assert (timing["precision"], timing["device"]) == (run["params"]["precision_used"], "cpu")


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


def _copy_inputs(pretrained, wd):
    shutil.copytree(pretrained, wd, ignore=shutil.ignore_patterns("models", "reports", ".resume"))
    return wd


def _files(root):
    """Every output but timing.json, the throughput: the one output that differs between identical runs."""
    return {str(p.relative_to(root)): p.read_bytes() for top in OUTPUTS for p in sorted((root / top).rglob("*"))
            if p.is_file() and p.name != "timing.json"}  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_stage_resumes_to_the_bytes_of_an_uninterrupted_run(pretrained, tmp_path):
    """torchrun SIGKILLed after the first epoch's resume checkpoint: its worker stops too; the re-run
    removes the killed run's temporary files, resumes, and writes every output byte for byte as the
    uninterrupted run (the fixture's) did, models/mflag/checkpoint.pt included."""
    wd = _copy_inputs(pretrained, tmp_path / "wd")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}  # as run_stage
    torchrun = subprocess.Popen(TORCHRUN, cwd=wd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)  # fmt: skip
    resume, workers = wd / ".resume/pretrain.pt", []
    try:
        while not resume.exists() and torchrun.poll() is None:
            workers = [int(c) for c in Path(f"/proc/{torchrun.pid}/task/{torchrun.pid}/children").read_text().split()]
            time.sleep(0.02)
        assert torchrun.poll() is None, f"the run ended before it could be killed: {torchrun.stderr.read()[-2000:]}"
        os.kill(torchrun.pid, signal.SIGKILL)  # the PID this test started
        torchrun.wait()
        assert workers and all(_wait_for_exit(pid) for pid in workers), "the worker outlived torchrun"
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert torch.load(resume, weights_only=True)["epoch"] >= 1
    stale = [wd / ".resume/.pretrain.pt.tmp4242", wd / "models/mflag/.checkpoint.pt.tmp4242"]
    for path in stale:  # what a kill during a save leaves
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    proc = run_stage(wd, *TORCHRUN)
    assert "pretrain: resuming after epoch" in proc.stdout
    assert not any(p.exists() for p in stale) and not resume.exists()
    ours, theirs = _files(wd), _files(pretrained)
    assert sorted(ours) == sorted(theirs)
    assert [k for k in ours if ours[k] != theirs[k]] == []


def _wait_for_exit(pid: int, timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    return not _alive(pid)


@pytest.mark.slow
def test_nan_embeddings_stop_the_stage_with_one_line_and_no_outputs(pretrained, tmp_path):
    wd = _copy_inputs(pretrained, tmp_path / "wd")
    emb = np.load(wd / "data/embeddings/mimic.npy")
    emb[:] = np.nan
    np.save(wd / "data/embeddings/mimic.npy", emb)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(TORCHRUN, cwd=wd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert re.search(r"^error: pretrain: non-finite loss at epoch 1 step 1: align=nan ortho=\S+ total=nan$",
                     proc.stderr, re.MULTILINE), proc.stderr[-3000:]  # fmt: skip
    # no traceback from the stage (torchrun then reports the failed worker in its own words)
    assert "stages/pretrain.py\", line" not in proc.stderr and "/mflag/" not in proc.stderr
    assert _files(wd) == {} and not (wd / ".resume/pretrain.pt").exists()
