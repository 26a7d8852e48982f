"""The ConVIRT-style baseline and M-FLAG's text_free_layers: a model whose LM top layers train on cached
lower-layer states, the InfoNCE objective in the shared loop (exact resume, dropout included), and the
stage's `convirt` method end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors import safe_open

from mflag.models import MFLAG, count_parameters
from mflag.pretrain import NonFiniteLoss, embed_texts, evaluate, train, with_report_states
from mflag.text import DEFAULT_LM, TextTower, load_frozen_lm, lower_layer_states
from tests.conftest import REPO, run_stage
from tests.test_pretrain import CPU1, TinyTrunk, _params, tiny_config, tiny_data

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            str(REPO / "stages/pretrain.py"))  # fmt: skip
MINILM_PARAMS, MINILM_LAYER = 22_713_216, 1_774_464  # all-MiniLM-L6-v2: the whole LM, one of its 6 layers
RESNET50 = 23_508_032  # torchvision's ResNet-50 without fc


@pytest.fixture(scope="module")
def enc(one_torch_thread):
    return load_frozen_lm(DEFAULT_LM, False)


def tower_model(enc, free_layers: int) -> MFLAG:
    torch.manual_seed(0)
    tower = TextTower(enc, free_layers, "cls", key="convirt.text_free_layers")
    return MFLAG(TinyTrunk(), text_dim=enc.dim, proj_hidden=24, proj_dim=12, feature_dim=32, text_tower=tower)


def tower_data(enc, free_layers: int, n: int = 24):
    data = tiny_data(n)
    data.text_emb = None  # the tower's states are the only text input
    return with_report_states(data, enc, free_layers, max_length=64, batch_size=8, device="cpu")


def test_report_states_hold_each_used_report_once(enc):
    data = tiny_data(24)  # "report 0", "report 0", "report 1", ...: two rows per report
    data.train_idx = np.arange(14)  # rows 14..19 belong to no split the run uses
    data = with_report_states(data, enc, 2, max_length=64, batch_size=5, device="cpu")
    of_row = data.report_states.report_of_row
    assert (of_row[14:20] == -1).all() and (of_row[:14] >= 0).all() and (of_row[20:] >= 0).all()
    used = [data.texts[i] for i in [*range(14), *range(20, 24)]]
    assert len(data.report_states.states) == len(set(used)) == 9
    for i in np.flatnonzero(of_row >= 0):
        assert all(of_row[j] == of_row[i] for j in range(24) if data.texts[j] == data.texts[i])
    rows = np.array([21, 3, 3, 0])
    batch = data.report_states.batch(rows)
    direct = lower_layer_states(enc, [data.texts[i] for i in rows], 2, 64, batch_size=4)
    for k, s in enumerate(direct):
        assert torch.equal(batch.hidden[k, : len(s)], s) and (batch.hidden[k, len(s) :] == 0).all()
        assert batch.mask[k].tolist() == [1] * len(s) + [0] * (batch.mask.shape[1] - len(s))


def test_exactly_the_trunk_projectors_and_top_layers_train(enc):
    model = tower_model(enc, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()}
    assert {n.split(".")[0] for n in trainable} == {"encoder", "proj_img", "proj_txt", "text_tower"}
    assert count_parameters(model.text_tower) == MINILM_LAYER
    assert not any(p.requires_grad for p in enc.model.parameters())  # the LM itself stays frozen


def test_a_resumed_convirt_run_equals_an_uninterrupted_one(enc, tmp_path):
    """InfoNCE through the tower (dropout on in its layers), killed after epoch 1 and resumed: the same
    weights and history, and the global generator left as it was found."""
    data, cfg = tower_data(enc, 1), tiny_config(objective="convirt", temperature=0.1, workers=2)
    whole = tower_model(enc, 1)
    before = _params(whole)
    rng = torch.get_rng_state()
    history = train(whole, data, cfg, CPU1, tmp_path / "a.pt", "fp", progress=False)
    assert torch.equal(rng, torch.get_rng_state())
    assert list(history["step"][0]) == ["step", "epoch", "infonce", "total", "lr"]
    assert all(r["infonce"] == r["total"] for r in history["step"])
    after = _params(whole)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("text_tower."))
    train(tower_model(enc, 1), data, cfg, CPU1, tmp_path / "b.pt", "fp", progress=False, stop_after_epoch=1)
    resumed = tower_model(enc, 1)
    assert train(resumed, data, cfg, CPU1, tmp_path / "b.pt", "fp", progress=False) == history
    assert all(torch.equal(v, after[k]) for k, v in _params(resumed).items())


def test_mflag_objective_trains_the_tower_too(enc, tmp_path):
    model = tower_model(enc, 1)
    before = _params(model)
    history = train(model, tower_data(enc, 1), tiny_config(epochs=1), CPU1, tmp_path / "m.pt", "fp", progress=False)
    assert list(history["epoch"][0]) == ["epoch", "align", "ortho", "total", "lr"]
    moved = {k.split(".")[0] for k, v in _params(model).items() if not torch.equal(v, before[k])}
    assert moved == {"encoder", "proj_img", "proj_txt", "text_tower"}


def test_evaluation_through_the_tower_does_not_depend_on_the_batch(enc):
    model, data = tower_model(enc, 2), tower_data(enc, 2)
    rows = np.arange(24)
    one = embed_texts(model, data, rows, 24, "cpu")
    np.testing.assert_allclose(embed_texts(model, data, rows, 5, "cpu"), one, atol=1e-5, rtol=0)
    metrics, _ = evaluate(model, data, crop=20, batch_size=5, device="cpu")
    assert metrics["valid_images"] == 4 and 0 <= metrics["i2t_r1"] <= metrics["i2t_r5"] <= 1


def test_nan_states_stop_a_convirt_run_naming_its_terms(enc, tmp_path):
    data = tower_data(enc, 1)
    for s in data.report_states.states:
        s[:] = float("nan")
    cfg = tiny_config(objective="convirt", temperature=0.1)
    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss at epoch 1 step 1: infonce=nan total=nan$"):
        train(tower_model(enc, 1), data, cfg, CPU1, tmp_path / "n.pt", "fp", progress=False)


def test_an_objective_without_its_params_is_refused():
    with pytest.raises(ValueError, match="objective convirt needs temperature"):
        tiny_config(objective="convirt")
    with pytest.raises(ValueError, match="objective must be one of mflag, convirt"):
        tiny_config(objective="clip", temperature=0.1)


# ------------------------------------------------------------------------------------ the stage
def _stage_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}  # as run_stage


def test_a_bad_method_is_a_one_line_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "stages/pretrain.py"), "clip"], cwd=tmp_path, env=_stage_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr == "error: pretrain: usage: stages/pretrain.py [mflag|convirt] (got 'clip')\n"


@pytest.mark.parametrize("method", ["convirt", "mflag"])
def test_more_free_layers_than_the_lm_has_is_refused_naming_the_key(tmp_path, method):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params[method]["text_free_layers"] = 7
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run([sys.executable, str(REPO / "stages/pretrain.py"), method], cwd=tmp_path,
                          env=_stage_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    expected = f"error: pretrain: {method}.text_free_layers is 7, but the language model has 6 layers"
    assert proc.stderr.splitlines()[-1] == expected
    assert "Traceback" not in proc.stderr and not (tmp_path / "models").exists()


def _inputs(stage_workdir, wd):
    shutil.copytree(stage_workdir, wd, ignore=shutil.ignore_patterns("models", "reports", ".resume"))
    return wd


def _outputs(root) -> dict[str, bytes]:
    """Every output file but timing.json (the one that differs between identical runs)."""
    return {str(p.relative_to(root)): p.read_bytes() for top in ("models/convirt", "reports/pretrain_convirt")
            for p in sorted((root / top).rglob("*")) if p.is_file() and p.name != "timing.json"}  # fmt: skip


def _projector(d_in: int, hidden: int, dim: int) -> int:
    return (d_in + 1) * hidden + 2 * hidden + (hidden + 1) * dim  # Linear, BN, ReLU, Linear, BN without affine


@pytest.fixture(scope="module")
def convirt_run(stage_workdir, tmp_path_factory):
    wd = _inputs(stage_workdir, tmp_path_factory.mktemp("convirt") / "wd")
    run_stage(wd, *TORCHRUN, "convirt")
    return wd


@pytest.mark.slow
def test_convirt_stage_outputs(convirt_run):
    wd = convirt_run
    assert not (wd / "models/mflag").exists() and not (wd / "reports/pretrain").exists()
    assert not (wd / ".resume/pretrain_convirt.pt").exists()
    m = json.loads((wd / "reports/pretrain_convirt/metrics.json").read_text())
    assert list(m)[:2] == ["loss_total", "loss_infonce"] and m["loss_total"] == m["loss_infonce"]
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "effective_rank",
                "mean_abs_offdiag_corr"):  # fmt: skip
        assert 0 <= m[key], key
    assert m["valid_images"] == len(pd.read_csv(wd / "data/cache/mimic/index.csv").query("split == 'valid'"))
    cfg = yaml.safe_load((wd / "params.yaml").read_text())
    hidden, dim, free = cfg["model"]["proj_hidden"], cfg["model"]["proj_dim"], cfg["convirt"]["text_free_layers"]
    tower = free * MINILM_LAYER
    assert m["params_trainable"] == RESNET50 + _projector(2048, hidden, dim) + _projector(384, hidden, dim) + tower
    assert m["params_frozen"] == MINILM_PARAMS - tower
    assert m["params_total"] == m["params_trainable"] + m["params_frozen"]
    losses = pd.read_csv(wd / "reports/pretrain_convirt/losses.csv")
    assert list(losses.columns) == ["step", "epoch", "infonce", "total", "lr"] and len(losses) >= 2
    live = wd / "reports/pretrain_convirt/live"
    assert sorted(str(p.relative_to(live)) for p in live.rglob("*") if p.is_file()) == [
        "metrics.json", *(f"plots/metrics/train/{k}.tsv" for k in ("infonce", "lr", "total"))]
    run = json.loads((wd / "models/convirt/run.json").read_text())
    assert list(run["params"])[:3] == ["seed", "convirt", "model"] and "loss" not in run["params"]
    assert run["text_model"]["layers"] == 6 and run["text_model"]["free_layers"] == free
    with safe_open(str(wd / "models/convirt/vision_encoder.safetensors"), "pt") as f:
        assert f.metadata() == {"init": "convirt"}
    ckpt = torch.load(wd / "models/convirt/checkpoint.pt", weights_only=True)
    assert sum(v.numel() for k, v in ckpt["model"].items() if k.startswith("text_tower.")) == tower
    timing = json.loads((wd / "reports/pretrain_convirt/timing.json").read_text())
    assert set(timing) == {"images_per_second", "seconds", "images", "text_precompute_seconds", "precision", "device",
                           "world_size"}  # fmt: skip
    epochs, batch = cfg["pretrain"]["epochs"], cfg["pretrain"]["batch_size"]
    n_train = len(pd.read_csv(wd / "data/cache/mimic/index.csv").query("split == 'train'"))
    assert timing["images"] == epochs * (n_train // batch) * batch
    assert timing["images_per_second"] > 0 and timing["text_precompute_seconds"] > 0


# Runs the stage without torchrun (one process) and stops it after its first epoch's resume checkpoint, as a
# kill would: train's stop_after_epoch, then an exit before any output is written.
STOPPED_AFTER_EPOCH_1 = """
import runpy, sys
import mflag.pretrain
real = mflag.pretrain.train
def first_epoch(*args, **kwargs):
    real(*args, **kwargs, stop_after_epoch=1)
    sys.exit("stopped after epoch 1")
mflag.pretrain.train = first_epoch
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_resumed_convirt_stage_writes_the_bytes_of_an_uninterrupted_one(convirt_run, tmp_path):
    wd = _inputs(convirt_run, tmp_path / "wd")
    proc = subprocess.run([sys.executable, "-c", STOPPED_AFTER_EPOCH_1, str(REPO / "stages/pretrain.py"), "convirt"],
                          cwd=wd, env=_stage_env(), capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.stderr.endswith("stopped after epoch 1\n"), proc.stderr[-3000:]
    resume = wd / ".resume/pretrain_convirt.pt"
    assert torch.load(resume, weights_only=True)["epoch"] == 1 and not (wd / "models/convirt").exists()
    proc = run_stage(wd, *TORCHRUN, "convirt")
    assert "pretrain: resuming after epoch 1" in proc.stdout and not resume.exists()
    ours, theirs = _outputs(wd), _outputs(convirt_run)
    assert sorted(ours) == sorted(theirs)
    assert [k for k in ours if ours[k] != theirs[k]] == []


@pytest.mark.slow
def test_mflag_with_a_free_layer_counts_it_as_trainable(stage_workdir, tmp_path):
    wd = _inputs(stage_workdir, tmp_path / "wd")
    params = yaml.safe_load((wd / "params.yaml").read_text())
    params["mflag"]["text_free_layers"] = 1
    (wd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_stage(wd, *TORCHRUN, "mflag")
    m = json.loads((wd / "reports/pretrain/metrics.json").read_text())
    hidden, dim = params["model"]["proj_hidden"], params["model"]["proj_dim"]
    assert list(m)[:3] == ["loss_total", "loss_align", "loss_ortho"]
    projectors = _projector(2048, hidden, dim) + _projector(384, hidden, dim)
    assert m["params_trainable"] == RESNET50 + projectors + MINILM_LAYER
    assert m["params_frozen"] == MINILM_PARAMS - MINILM_LAYER
    columns = list(pd.read_csv(wd / "reports/pretrain/losses.csv").columns)
    assert columns == ["step", "epoch", "align", "ortho", "total", "lr"]
    run = json.loads((wd / "models/mflag/run.json").read_text())
    assert run["params"]["mflag"] == {"text_free_layers": 1} and run["text_model"]["free_layers"] == 1
    assert json.loads((wd / "reports/pretrain/timing.json").read_text())["text_precompute_seconds"] > 0
