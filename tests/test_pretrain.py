"""The pretraining loop: exact resume, DDP equivalence, frozen LM, and the stage end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from mflag.augment import AugmentSpec, augment_batch
from mflag.distributed import DistEnv
from mflag.models import MFLAG
from mflag.pretrain import PretrainData, TrainConfig, _seed, compute_losses, epoch_batches, train

REPO = Path(__file__).resolve().parents[1]
CPU1 = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class TinyTrunk(nn.Module):
    """A small CNN standing in for ResNet-50 where only the loop's behaviour is under test."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 32)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def tiny_model() -> MFLAG:
    torch.manual_seed(0)
    return MFLAG(TinyTrunk(), text_dim=16, proj_hidden=24, proj_dim=12, feature_dim=32)


def tiny_data(n: int = 24) -> PretrainData:
    rng = np.random.default_rng(0)
    return PretrainData(
        images=rng.integers(0, 256, size=(n, 24, 24), dtype=np.uint8),
        text_emb=rng.normal(size=(n, 16)).astype(np.float32),
        train_idx=np.arange(n - 4),
        valid_idx=np.arange(n - 4, n),
        texts=[f"report {i // 2}" for i in range(n)],
    )


def tiny_config(**kw) -> TrainConfig:
    base = dict(
        epochs=3, batch_size=4, lr=1e-2, weight_decay=0.05, betas=(0.9, 0.999), restart_fraction=0.4, eta_min=1e-8,
        precision="fp32", channels_last=False, workers=0,
        augment=AugmentSpec(crop=20, rotation=(0.0, 90.0), perspective_p=0.5, perspective_distortion=0.5, autocontrast_p=0.5),
        ortho_weight=1.0, ortho_offdiag_weight=0.0051, ortho_on="backbone", seed=7, log_every=1,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def ddp_case() -> tuple[TrainConfig, PretrainData]:
    """One step: a global batch of 8, two ranks of 4 (shared with tests/_ddp_worker.py)."""
    data = tiny_data(12)
    data.train_idx = np.arange(8)
    return tiny_config(epochs=1, batch_size=4), data


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    data, cfg = tiny_data(), tiny_config(workers=2)
    whole = tiny_model()
    train(whole, data, cfg, CPU1, tmp_path / "a.pt", "fp", progress=False)
    # first run dies after its epoch-1 checkpoint; a new process (fresh model) resumes from it
    first = tiny_model()
    train(first, data, cfg, CPU1, tmp_path / "b.pt", "fp", progress=False, stop_after_epoch=1)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["epoch"] == 1
    resumed = tiny_model()
    history = train(resumed, data, cfg, CPU1, tmp_path / "b.pt", "fp", progress=False)
    a, b = _params(whole), _params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert [r["epoch"] for r in history["epoch"]] == [1, 2, 3]


def test_checkpoint_of_another_config_is_not_resumed(tmp_path):
    data, cfg = tiny_data(), tiny_config(epochs=1)
    first = tiny_model()
    train(first, data, cfg, CPU1, tmp_path / "c.pt", "config-A", progress=False)
    other = tiny_model()
    history = train(other, data, cfg, CPU1, tmp_path / "c.pt", "config-B", progress=False)
    assert [r["epoch"] for r in history["epoch"]] == [1]  # started afresh


def test_losses_fall_and_the_learning_rate_restarts(tmp_path, capsys):
    data, cfg = tiny_data(64), tiny_config(epochs=6, restart_fraction=0.5, ortho_weight=0.1)
    history = train(tiny_model(), data, cfg, CPU1, tmp_path / "d.pt", "fp", progress=False)
    totals = [r["total"] for r in history["epoch"]]
    assert totals[-1] < totals[0]
    # one progress line per epoch (also without the bar), with its losses and its time
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pretrain epoch")]
    assert len(lines) == 6
    for e, (line, rec) in enumerate(zip(lines, history["epoch"]), start=1):
        assert line.startswith(f"pretrain epoch {e}/6: total {rec['total']:.4f} align {rec['align']:.4f} ")
        assert re.search(r"\(\d+\.\d s, \d+\.\d img/s\)$", line), line
    lrs = [r["lr"] for r in history["step"]]
    assert lrs[0] == pytest.approx(cfg.lr)
    assert any(b > a for a, b in zip(lrs, lrs[1:]))  # a warm restart


def test_ortho_weight_is_applied(tmp_path):
    """Training with the orthogonality term leaves features closer to orthogonal (c = z^T z / B near I)."""
    from mflag.augment import center_crop_normalize
    from mflag.losses import orthogonality_loss

    data = tiny_data(96)
    data.train_idx = np.arange(96)
    x = center_crop_normalize(torch.from_numpy(data.images[:64]), 20)
    measured = {}
    for w in (0.0, 5.0):
        model = tiny_model()
        train(model, data, tiny_config(epochs=6, ortho_weight=w), CPU1, tmp_path / f"o{w}.pt", "fp", progress=False)
        with torch.no_grad():
            h, _ = model.encode_image(x)
        measured[w] = orthogonality_loss(h, 0.0051).item()
    assert measured[5.0] < 0.5 * measured[0.0]


@pytest.mark.parametrize(
    "kind", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
)
def test_ddp_step_equals_the_average_of_per_rank_losses(tmp_path, kind, monkeypatch):
    """2 processes under torchrun == one process averaging the two ranks' per-half losses (fp32)."""
    cfg, data = ddp_case()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "tests" / "_ddp_worker.py"), str(tmp_path), kind],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_state = torch.load(tmp_path / "ddp_state.pt", map_location="cpu")
    device = torch.device(kind)
    if kind == "cuda":  # the worker's setting: full fp32 matmuls and convolutions (restored afterwards)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    # reference: one process, batch norm and the orthogonality term per half, gradients averaged
    model = tiny_model().to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    losses = []
    for rank in (0, 1):
        rows = epoch_batches(data, cfg, 0, DistEnv(rank, 2, rank, torch.device("cpu")))[0]
        gen = torch.Generator().manual_seed(_seed(cfg.seed, "augment", rank, 0))
        images = augment_batch(torch.from_numpy(data.images[rows]).to(device), cfg.augment, gen)
        losses.append(compute_losses(model, images, torch.from_numpy(data.text_emb[rows]).to(device), cfg)["total"])
    ((losses[0] + losses[1]) / 2).backward()
    # A bias right before a batch norm has a true gradient of 0; Adam's first step turns its rounding
    # noise (1e-8 to 1e-5 here) into a full +-lr step of either sign, so those are left out of the comparison.
    noise_only = {n for n, p in model.named_parameters() if p.grad.abs().max() < 1e-4}  # others: > 0.1
    opt.step()
    compared = 0
    for name, p in model.named_parameters():
        if name not in noise_only:
            torch.testing.assert_close(ddp_state[name], p.detach().cpu(), rtol=1e-5, atol=1e-6)
            compared += 1
    assert compared >= 12 and noise_only <= {n for n in ddp_state if n.endswith(".bias")}
    assert set(ddp_state) == set(model.state_dict())


def test_the_language_model_stays_frozen():
    """Pretraining touches the cached embeddings only; the LM's weights and grads are never touched."""
    from mflag.text import DEFAULT_LM, embed_texts, load_frozen_lm

    enc = load_frozen_lm(DEFAULT_LM, False)
    before = {k: v.clone() for k, v in enc.model.state_dict().items()}
    emb = embed_texts(enc, ["No acute process.", "Small left pleural effusion."], 64, "cls", 2, progress=False)
    model = MFLAG(TinyTrunk(), text_dim=emb.shape[1], proj_hidden=8, proj_dim=4, feature_dim=32)
    out = model(torch.randn(2, 3, 20, 20), torch.from_numpy(emb))
    (out.z_txt.sum() + out.z_img.sum()).backward()
    assert all(p.grad is None and not p.requires_grad for p in enc.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in enc.model.state_dict().items())
    assert not enc.model.training


def test_frozen_stages_keep_their_init_and_batch_norm_statistics(tmp_path):
    """frozen_stages=2: stem, layer1, layer2 bit-identical (weights and BN buffers) after training;
    layer3, layer4 and the projectors move. A real (small-input) ResNet-50."""
    from mflag.models import resnet50_trunk

    torch.manual_seed(0)
    model = MFLAG(resnet50_trunk(), text_dim=16, proj_hidden=32, proj_dim=8, frozen_stages=2)
    before = _params(model)
    data = tiny_data(12)
    data.train_idx = np.arange(8)
    train(model, data, tiny_config(epochs=1, batch_size=4), CPU1, tmp_path / "r.pt", "f", progress=False)
    after = _params(model)
    frozen = ("encoder.conv1.", "encoder.bn1.", "encoder.layer1.", "encoder.layer2.")
    for k in before:
        if k.startswith(frozen):
            assert torch.equal(before[k], after[k]), k
    for prefix in ("encoder.layer3.", "encoder.layer4.", "proj_img.", "proj_txt."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    assert model.training and not model.encoder.layer2.training and model.encoder.layer3.training
    with pytest.raises(ValueError, match="0..4"):
        MFLAG(resnet50_trunk(), 16, 32, 8, frozen_stages=5)
