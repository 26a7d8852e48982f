"""Hostile and broken inputs to pretraining: a malicious or corrupt resume file, a killed run's leftovers,
a non-finite loss, last-bit float noise in the reports."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mflag.pretrain
from mflag.pretrain import NonFiniteLoss, checkpoint_bytes, remove_stale_temporaries, train, write_reports
from tests.test_pretrain import CPU1, REPO, _params, tiny_config, tiny_data, tiny_model


class Payload:
    """Unpickling this creates `marker`: what a hostile resume file would do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """epochs -> (weights, history) of an uninterrupted run from scratch with tiny_config(epochs=epochs)."""
    runs = {}
    for epochs in (1, 3):
        model = tiny_model()
        path = tmp_path_factory.mktemp("fresh") / "r.pt"
        history = train(model, tiny_data(), tiny_config(epochs=epochs), CPU1, path, "fp", progress=False)
        runs[epochs] = (_params(model), history)
    return runs


def _same_run(model, history, reference) -> bool:
    weights, ref_history = reference
    return history == ref_history and all(torch.equal(v, weights[k]) for k, v in _params(model).items())


# -- 1. the resume file is read without unpickling code ---------------------------------------------------


@pytest.mark.parametrize("layout", ["zip", "legacy", "plain-pickle"])
def test_a_malicious_resume_file_runs_no_code_and_training_starts_afresh(tmp_path, capsys, layout, fresh):
    marker, resume = tmp_path / "pwned", tmp_path / ".resume" / "pretrain.pt"
    resume.parent.mkdir()
    evil = {"fingerprint": "fp", "epoch": 1, "history": Payload(marker)}  # the right fingerprint, even
    if layout == "plain-pickle":
        resume.write_bytes(pickle.dumps(evil))
    else:
        torch.save(evil, resume, _use_new_zipfile_serialization=layout == "zip")
    model = tiny_model()
    history = train(model, tiny_data(), tiny_config(epochs=1), CPU1, resume, "fp", progress=False)
    assert not marker.exists(), "unpickling the resume file ran code"
    err = capsys.readouterr().err
    assert f"warning: pretrain: ignoring the resume checkpoint {resume}: " in err
    assert "training starts from scratch" in err and "Traceback" not in err and "it was not unpickled" in err
    if layout != "plain-pickle":  # torch.save's pickle protocol 2; the refused global is named
        assert "(Unsupported global: GLOBAL io.open was not an allowed global by default)" in err
    assert "weights_only=False" not in err  # the warning does not suggest the unsafe way round
    assert _same_run(model, history, fresh[1])
    # the run replaced it with a checkpoint that loads safely
    assert torch.load(resume, weights_only=True)["epoch"] == 1


def _epoch1_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "r.pt"
    train(tiny_model(), tiny_data(), tiny_config(), CPU1, path, "fp", progress=False, stop_after_epoch=1)
    return path


def _edit(path: Path, **changes) -> None:
    ckpt = torch.load(path, weights_only=True)
    ckpt.update(changes)
    torch.save(ckpt, path)


@pytest.mark.parametrize(
    "damage, reason",
    [pytest.param(*case, id=case[0]) for case in [
        ("garbage", "its pickle holds something other than tensors, numbers and plain containers (Unsupported operand"),
        ("truncated", "it cannot be read"),
        ("empty", "it cannot be read"),
        ("not a dict", "it is not a resume checkpoint"),
        ("other fingerprint", "it was written by a run with other params or other inputs"),
        ("history not json", "its contents do not fit this run"),
        ("history of another layout", "its contents do not fit this run"),
        ("epoch out of range", "its contents do not fit this run"),
        ("another model", "its contents do not fit this run"),
        ("optimizer of another model", "its optimiser state does not fit this run"),
    ]],
)
def test_a_broken_resume_file_is_ignored_with_a_warning(tmp_path, capsys, damage, reason, fresh):
    path = _epoch1_checkpoint(tmp_path)
    if damage == "garbage":
        path.write_bytes(random.Random(0).randbytes(4096))  # seeded: the unpickler's complaint depends on the bytes
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "not a dict":
        torch.save([1, 2, 3], path)
    elif damage == "other fingerprint":
        _edit(path, fingerprint="another run")
    elif damage == "history not json":
        _edit(path, history="{not json")
    elif damage == "history of another layout":
        _edit(path, history=json.dumps({"step": [{"step": "one"}], "epoch": []}))
    elif damage == "epoch out of range":
        _edit(path, epoch=99)
    elif damage == "another model":
        ckpt = torch.load(path, weights_only=True)
        _edit(path, model={k: torch.zeros(1) for k in ckpt["model"]})
    elif damage == "optimizer of another model":
        _edit(path, optimizer=torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).state_dict())
    capsys.readouterr()
    model = tiny_model()
    history = train(model, tiny_data(), tiny_config(), CPU1, path, "fp", progress=False)
    err = capsys.readouterr().err
    assert f"warning: pretrain: ignoring the resume checkpoint {path}: {reason}" in err, err
    assert "Traceback" not in err
    assert _same_run(model, history, fresh[3])  # all three epochs, from scratch


def test_the_resume_file_holds_only_what_loads_safely(tmp_path):
    ckpt = torch.load(_epoch1_checkpoint(tmp_path), weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "scheduler", "scaler", "epoch", "history", "fingerprint", "config"}
    assert isinstance(ckpt["history"], str) and [r["epoch"] for r in json.loads(ckpt["history"])["epoch"]] == [1]


# -- 2. leftovers of an interrupted run ---------------------------------------------------------------------


def test_a_resumed_run_writes_the_checkpoint_bytes_of_an_uninterrupted_run(tmp_path):
    """The pickle refers back to strings by object identity; a history read back from the resume file
    would otherwise pickle differently from the uninterrupted run's (same content, other bytes)."""
    data, cfg = tiny_data(), tiny_config(workers=2)
    run_params = {"seed": 42, "pretrain": {"lr": 0.01, "epochs": 3, "betas": (0.9, 0.999)}, "precision_used": "fp32"}
    whole = tiny_model()
    whole_history = train(whole, data, cfg, CPU1, tmp_path / "a.pt", "fp", progress=False)
    train(tiny_model(), data, cfg, CPU1, tmp_path / "b.pt", "fp", progress=False, stop_after_epoch=1)
    resumed = tiny_model()
    resumed_history = train(resumed, data, cfg, CPU1, tmp_path / "b.pt", "fp", progress=False)
    a = checkpoint_bytes(whole, whole_history, run_params)
    assert a == checkpoint_bytes(resumed, resumed_history, run_params)
    ckpt = torch.load(io.BytesIO(a), weights_only=True)  # still a torch checkpoint, safely loadable
    assert set(ckpt) == {"model", "history", "params"} and ckpt["params"]["pretrain"]["lr"] == 0.01
    assert all(torch.equal(ckpt["model"][k], v) for k, v in whole.state_dict().items())
    # channels_last weights are written contiguous, so the memory format leaves the bytes alone
    nhwc = tiny_model().to(memory_format=torch.channels_last)
    nhwc.load_state_dict(whole.state_dict())
    assert checkpoint_bytes(nhwc, whole_history, run_params) == a


def test_a_killed_runs_temporary_files_are_removed_at_the_next_start(tmp_path, capsys):
    resume = tmp_path / ".resume" / "pretrain.pt"
    resume.parent.mkdir()
    stale = [resume.parent / ".pretrain.pt.tmp4242", resume.parent / ".pretrain.pt.tmp17"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    other = resume.parent / "keep.txt"
    other.write_text("not ours")
    train(tiny_model(), tiny_data(), tiny_config(epochs=1), CPU1, resume, "fp", progress=False)
    assert not any(p.exists() for p in stale) and other.exists()
    out = capsys.readouterr().out
    assert all(f"pretrain: removed {p}, left by a killed run" in out for p in stale)
    # the stage's outputs (mflag.io.atomic_write's temporaries) are cleaned the same way
    out_file = tmp_path / "models" / "checkpoint.pt"
    out_file.parent.mkdir()
    (out_file.parent / ".checkpoint.pt.tmp99").write_bytes(b"x")
    assert remove_stale_temporaries(out_file) == [out_file.parent / ".checkpoint.pt.tmp99"]
    assert remove_stale_temporaries(tmp_path / "absent" / "x.pt") == []


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its new parent, counts as stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_until(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_a_worker_ends_when_its_parent_is_killed(tmp_path):
    """mflag.distributed.exit_with_parent: a grandchild that called it ends when its parent is SIGKILLed."""
    code = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import sys, time; from mflag.distributed import "
        "exit_with_parent; exit_with_parent(); open(sys.argv[1], \"w\").close(); time.sleep(600)', sys.argv[1]],"
        " start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )  # fmt: skip
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", code, str(ready)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        worker = int(parent.stdout.readline())
        assert _wait_until(ready.exists, 60), "the worker did not start"
        parent.kill()
        parent.wait()
        assert _wait_until(lambda: not _alive(worker), 10), "the worker outlived its parent"
    finally:
        parent.kill()
        if "worker" in locals() and _alive(worker):
            os.kill(worker, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(
    "sig",
    [pytest.param(signal.SIGKILL, id="SIGKILL"), pytest.param(signal.SIGTERM, id="SIGTERM", marks=pytest.mark.slow),
     pytest.param(signal.SIGINT, id="SIGINT", marks=pytest.mark.slow)],
)  # fmt: skip
def test_stopping_torchrun_stops_its_training_workers(tmp_path, sig):
    """A real torchrun, two CPU ranks over gloo, training a toy model until stopped. torchrun starts its
    workers in sessions of their own: on SIGTERM and SIGINT it stops them itself; when it is SIGKILLed,
    the workers end because their parent did (mflag.distributed.exit_with_parent)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "tests" / "_ddp_worker.py"), str(tmp_path), "cpu", "forever"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    pid_files = [tmp_path / f"worker{r}.pid" for r in (0, 1)]
    workers: list[int] = []
    try:
        started = _wait_until(lambda: all(p.exists() and p.read_text() for p in pid_files) and (tmp_path / "resume.pt").exists(), 120)
        assert started, "the workers did not start training"
        workers = [int(p.read_text()) for p in pid_files]
        assert set(workers) <= set(_children(torchrun.pid)) and all(map(_alive, workers))
        os.kill(torchrun.pid, sig)  # the PID this test started
        torchrun.wait(timeout=60)
        assert _wait_until(lambda: not any(map(_alive, workers)), 15), f"workers outlived torchrun after {sig.name}"
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# -- 3. a non-finite loss stops the run -------------------------------------------------------------------


def test_nan_embeddings_stop_pretraining_at_the_first_step(tmp_path):
    data = tiny_data()
    data.text_emb[:] = np.nan
    logged = []
    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss at epoch 1 step 1: align=nan ortho=\d\S* total=nan$"):
        train(tiny_model(), data, tiny_config(workers=2), CPU1, tmp_path / "r.pt", "fp", log=logged.append, progress=False)
    assert logged == [] and not (tmp_path / "r.pt").exists()


def test_a_loss_that_turns_non_finite_stops_at_that_step(tmp_path, monkeypatch):
    real, calls = mflag.pretrain.compute_losses, []

    def blowing_up(*args):
        losses = real(*args)
        calls.append(1)
        if len(calls) == 8:  # epoch 2 (5 steps an epoch), step 8
            losses["ortho"] = losses["ortho"] * float("inf")
            losses["total"] = losses["align"] + losses["ortho"]
        return losses

    monkeypatch.setattr(mflag.pretrain, "compute_losses", blowing_up)
    resume, logged = tmp_path / "r.pt", []
    with pytest.raises(NonFiniteLoss) as err:
        train(tiny_model(), tiny_data(), tiny_config(), CPU1, resume, "fp", log=logged.append, progress=False)
    assert str(err.value).startswith("non-finite loss at epoch 2 step 8: align=")
    assert str(err.value).endswith(" ortho=inf total=inf")
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6, 7]  # nothing logged from the bad step
    assert torch.load(resume, weights_only=True)["epoch"] == 1  # the last good epoch's checkpoint stays


# -- 4. reports keep 10 significant digits -----------------------------------------------------------------


def _reports(folder: Path, eps: float) -> dict[str, bytes]:
    rng = np.random.default_rng(3)

    def noisy(x: float) -> float:
        return x * (1 + eps)

    report = {"loss_total": noisy(1.2345678901234567), "effective_rank": 64.36621776145336 if eps == 0 else 64.3662177614533,
              "i2t_r1": 0.25, "mean_abs_offdiag_corr": noisy(0.031415926535897934), "valid_images": 40,
              "trainable_share": noisy(0.5087331163952412)}  # fmt: skip
    history = {"step": [{"step": s, "epoch": 1, "align": noisy(3.1 + s / 7), "ortho": noisy(12.0 / s),
                         "total": noisy(15.1 + s / 3), "lr": noisy(1e-4 * (1 + np.cos(s)) / 2)} for s in range(1, 9)],
               "epoch": []}  # fmt: skip
    spectrum = np.sort(rng.gamma(2.0, 3.0, size=32))[::-1] * (1 + eps)
    write_reports(folder, report, history, spectrum)
    return {name: (folder / name).read_bytes() for name in ("metrics.json", "losses.csv", "spectrum.csv")}


def test_last_bit_noise_leaves_the_report_bytes_alone(tmp_path):
    exact = _reports(tmp_path / "a", 0.0)
    assert exact == _reports(tmp_path / "b", 3e-15)  # a change in the 15th significant digit
    metrics = json.loads(exact["metrics.json"])
    assert metrics["effective_rank"] == 64.36621776 and metrics["valid_images"] == 40
    assert exact["spectrum.csv"].decode().splitlines()[0] == "index,singular_value"
    assert exact["losses.csv"].decode().splitlines()[1] == "1,1,3.242857143,12.0,15.43333333,7.701511529e-05"
    assert _reports(tmp_path / "c", 1e-6) != exact  # a real change still shows
