"""The ResNet-50 trunk of mflag.models (torchvision's resnet50 without its classifier): its state keys,
seeded init, forward shape, the encoder files save_trunk writes and load_trunk reads (strictly), and the
ImageNet path."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mflag.models import FEATURE_DIM, VisionInitError, build_trunk, load_trunk, resnet50_trunk, save_trunk

REPO = Path(__file__).resolve().parents[1]


def test_trunk_has_no_classifier_and_keeps_torchvision_names():
    net = resnet50_trunk()
    assert isinstance(net.fc, nn.Identity)
    keys = list(net.state_dict())
    # torchvision's names in torchvision's order, buffers included, less the 2048 -> 1000 classifier
    full = [k for k in torchvision.models.resnet50(weights=None).state_dict()]
    assert keys == [k for k in full if not k.startswith("fc.")]
    assert not any(k.startswith("fc.") for k in keys)
    assert {"conv1.weight", "bn1.running_mean", "layer2.0.downsample.0.weight",
            "layer4.2.bn3.num_batches_tracked"} <= set(keys)
    assert len(keys) == 318
    assert sum(p.numel() for p in net.parameters()) == 23_508_032  # ResNet-50's 25,557,032 less the fc


def test_forward_gives_pooled_2048_features_in_train_and_eval_mode():
    torch.manual_seed(0)
    net = resnet50_trunk()
    x = torch.randn(2, 3, 64, 48)
    for train in (False, True):
        net.train(train)
        with torch.no_grad():
            out = net(x)
        assert out.shape == (2, FEATURE_DIM) and torch.isfinite(out).all()


def test_seeded_init_is_reproducible_and_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = build_trunk("random", "", 0).state_dict(), build_trunk("random", "", 0).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)  # build_trunk forks the generator
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    c = build_trunk("random", "", 1).state_dict()
    assert not torch.equal(a["layer1.0.conv1.weight"], c["layer1.0.conv1.weight"])
    # batch norm starts at weight 1, bias 0 (torchvision's init), convolutions are drawn
    assert torch.equal(a["bn1.weight"], torch.ones(64)) and torch.equal(a["bn1.bias"], torch.zeros(64))
    assert a["conv1.weight"].std() > 0
    with pytest.raises(VisionInitError, match="random or imagenet"):
        build_trunk("scratch", "", 0)


def test_save_and_load_round_trip(tmp_path):
    net = build_trunk("random", "", 7)
    with torch.no_grad():  # running statistics are part of the file too
        net.bn1.running_mean.add_(0.5)
        net.layer4[2].bn3.num_batches_tracked.fill_(11)
    path = tmp_path / "sub" / "vision_encoder.safetensors"
    save_trunk(net, path, init="random, seed 7")
    assert sorted(p.name for p in path.parent.iterdir()) == ["vision_encoder.safetensors"]  # no temporary left
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"init": "random, seed 7"}
        assert set(f.keys()) == set(net.state_dict())
    back = load_trunk(path)
    assert isinstance(back.fc, nn.Identity)
    ref = net.state_dict()
    for k, v in back.state_dict().items():
        assert v.dtype == ref[k].dtype and torch.equal(v, ref[k]), k
    x = torch.randn(1, 3, 64, 64)
    net.eval()
    back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)


def test_load_trunk_is_strict_and_names_the_file(tmp_path):
    state = {k: v.contiguous() for k, v in build_trunk("random", "", 0).state_dict().items()}
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in state.items() if k != "layer3.1.conv2.weight"}, str(missing))
    with pytest.raises(VisionInitError, match=r"missing\.safetensors.*layer3\.1\.conv2\.weight"):
        load_trunk(missing)
    extra = tmp_path / "with_fc.safetensors"
    save_file(state | {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}, str(extra))
    with pytest.raises(VisionInitError, match=r"with_fc\.safetensors.*fc\.(weight|bias)"):
        load_trunk(extra)
    wrong = tmp_path / "wrong_shape.safetensors"
    save_file(state | {"conv1.weight": torch.zeros(64, 1, 7, 7)}, str(wrong))
    with pytest.raises(VisionInitError, match=r"(?s)wrong_shape\.safetensors.*conv1\.weight"):
        load_trunk(wrong)
    with pytest.raises(VisionInitError, match=r"nowhere\.safetensors"):
        load_trunk(tmp_path / "nowhere.safetensors")


def test_torchvision_state_dict_with_classifier_loads_through_the_imagenet_path(tmp_path):
    from mflag.models import load_imagenet_trunk

    torch.manual_seed(5)
    full = torchvision.models.resnet50(weights=None)  # with its fc, as the ImageNet files are
    path = tmp_path / "resnet50.pth"
    torch.save(full.state_dict(), path)
    net = load_imagenet_trunk(path)
    assert isinstance(net.fc, nn.Identity)
    for k, v in net.state_dict().items():
        assert torch.equal(v, full.state_dict()[k]), k
    with pytest.raises(VisionInitError, match="no file there"):
        load_imagenet_trunk(tmp_path / "absent.pth")


@pytest.mark.slow
def test_init_random_writes_the_same_bytes_in_every_process(tmp_path):
    # dvc.lock records the encoder file's md5, so two runs must write the same bytes. (safetensors writes
    # two or more metadata keys in a different order per process; the stage writes one.)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    out = tmp_path / "models/random/vision_encoder.safetensors"
    digests = set()
    for _ in range(6):  # with two keys, six runs agree by chance 1 time in 32
        subprocess.run([sys.executable, str(REPO / "stages/init_random.py")], cwd=tmp_path, check=True,
                       capture_output=True, env={"PYTHONPATH": str(REPO), "PATH": ""})  # fmt: skip
        digests.add(hashlib.md5(out.read_bytes()).hexdigest())
    assert len(digests) == 1
    assert set(load_file(str(out))) == set(resnet50_trunk().state_dict())
    # and the bytes dvc.lock records for this seed: a change of the trunk's init would re-run every
    # fine-tune cell of the random baseline with other weights
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"].get("init_random")
    seed = yaml.safe_load((REPO / "params.yaml").read_text())["seed"]
    if lock is None or lock["params"]["params.yaml"]["seed"] != seed:
        pytest.skip("dvc.lock records no init_random run for params.yaml's seed")
    assert digests == {lock["outs"][0]["md5"]}
