"""mflag's U-Net against the reference, segmentation-models-pytorch's Unet("resnet50", classes=1)."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch

from mflag.finetune.unet import Unet


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pair(decoder_channels, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ours = Unet(decoder_channels)
        after_ours = torch.rand(3)  # where each leaves the generator
        torch.manual_seed(seed)
        ref = smp.Unet(encoder_name="resnet50", encoder_weights=None, classes=1, decoder_channels=decoder_channels)
        after_ref = torch.rand(3)
    return ours, ref, after_ours, after_ref


@pytest.mark.parametrize("decoder_channels", [(256, 128, 64, 32, 16), (32, 16, 16, 8, 8)])
def test_same_seed_same_names_and_weights_as_smp(decoder_channels):
    ours, ref, after_ours, after_ref = _pair(decoder_channels)
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    assert torch.equal(after_ours, after_ref)  # the same number of draws
    # a different seed gives other decoder weights (the comparison above is not vacuous)
    other, *_ = _pair(decoder_channels, seed=1)
    assert not torch.equal(other.state_dict()["decoder.blocks.0.conv1.0.weight"], a["decoder.blocks.0.conv1.0.weight"])


@pytest.mark.parametrize("side", [32, 64])
def test_forward_matches_smp(side):
    ours, ref, *_ = _pair((32, 16, 16, 8, 8), seed=3)
    # non-trivial batch-norm statistics, shared by both
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.rand(v.shape, generator=g) + 0.5 if k.endswith("running_var") else
                 torch.randn(v.shape, generator=g) * 0.1 if k.endswith("running_mean") else v)
             for k, v in ref.state_dict().items()}
    ours.load_state_dict(state)
    ref.load_state_dict(state)
    ours.eval()
    ref.eval()
    x = torch.randn(2, 3, side, side, generator=g)
    with torch.no_grad():
        got, want = ours(x), ref(x)
        levels_ours, levels_ref = ours.encoder(x), ref.encoder(x)
    assert got.shape == (2, 1, side, side)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert [t.shape for t in levels_ours] == [t.shape for t in levels_ref]
    for u, v in zip(levels_ours, levels_ref):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_frozen_encoder_stays_in_eval_and_other_sides_are_refused():
    model = Unet((32, 16, 16, 8, 8))
    model.freeze_encoder()
    model.train()
    assert not model.encoder.training and model.decoder.training and model.segmentation_head.training
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(1, 3, 48, 40))
    with pytest.raises(ValueError, match="decoder_channels needs 5"):
        Unet((32, 16))
