"""mflag.resnet.ResNet50 against torchvision's resnet50 (the independent reference): same names, shapes,
seeded init to the bit, same forward pass, and torchvision state dicts load into it."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from mflag.models import build_trunk, resnet50_trunk


def _reference(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = torchvision.models.resnet50(weights=None)
    net.fc = nn.Identity()
    return net


def test_seeded_init_equals_torchvision_bit_for_bit():
    for seed in (0, 42):
        ours = build_trunk("random", "", seed).state_dict()
        ref = _reference(seed).state_dict()
        assert list(ours) == list(ref)  # names and order, buffers included
        for k in ref:
            assert ours[k].shape == ref[k].shape, k
            assert torch.equal(ours[k], ref[k]), k
    a, b = build_trunk("random", "", 0).state_dict(), build_trunk("random", "", 1).state_dict()
    assert not torch.equal(a["layer1.0.conv1.weight"], b["layer1.0.conv1.weight"])


def test_forward_equals_torchvision_in_train_and_eval_mode():
    ref = _reference(3)
    ours = resnet50_trunk()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 48)
    for train in (False, True):
        ref.train(train)
        ours.train(train)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    assert ours(x).shape == (2, 2048)


def test_torchvision_state_dict_with_classifier_loads_through_the_imagenet_path(tmp_path):
    from mflag.models import load_imagenet_trunk

    torch.manual_seed(5)
    full = torchvision.models.resnet50(weights=None)  # with its fc, as the ImageNet files are
    path = tmp_path / "resnet50.pth"
    torch.save(full.state_dict(), path)
    net = load_imagenet_trunk(path)
    assert torch.equal(net.state_dict()["layer4.2.bn3.running_var"], full.state_dict()["layer4.2.bn3.running_var"])
    assert torch.equal(net.state_dict()["conv1.weight"], full.state_dict()["conv1.weight"])


def test_init_random_writes_the_same_bytes_in_every_process(tmp_path):
    # dvc.lock records the encoder file's md5, so two runs must write the same bytes. (safetensors writes
    # two or more metadata keys in a different order per process; the stage writes one.)
    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "params.yaml", tmp_path / "params.yaml")
    digests = set()
    for _ in range(6):  # with two keys, six runs agree by chance 1 time in 32
        subprocess.run([sys.executable, str(repo / "stages/init_random.py")], cwd=tmp_path, check=True,
                       capture_output=True, env={"PYTHONPATH": str(repo), "PATH": ""})  # fmt: skip
        digests.add(hashlib.md5((tmp_path / "models/random/vision_encoder.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
