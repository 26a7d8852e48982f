"""mflag.optim.AdamW against torch.optim.AdamW (the reference), bit for bit on CPU."""

import subprocess
import sys

import pytest
import torch

from mflag.optim import AdamW


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


@pytest.mark.parametrize("lr,weight_decay,betas", [(5e-4, 1e-6, (0.9, 0.999)), (1e-2, 0.05, (0.8, 0.99))])
def test_adamw_matches_torch_bit_for_bit(lr, weight_decay, betas):
    ours, ref = _model(0), _model(0)
    opt = AdamW(ours.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
    gen = torch.Generator().manual_seed(1)
    for step in range(25):
        x, y = torch.randn(16, 7, generator=gen), torch.randn(16, 3, generator=gen)
        for model, o in ((ours, opt), (ref, opt_ref)):
            o.zero_grad(set_to_none=True)
            model[0].weight.requires_grad_(step % 7 != 3)  # some steps: the first layer gets no gradient at all
            loss = (model(x) - y).pow(2).mean()
            model[0].weight.requires_grad_(True)
            loss.backward()
            o.step()
        for a, b in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(a, b), f"step {step}"
    # the parameters moved (the comparison above is not between two frozen models)
    assert not torch.equal(next(ours.parameters()), next(_model(0).parameters()))


def test_empty_parameter_list_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        AdamW([], lr=1e-3)


def test_importing_and_stepping_does_not_load_dynamo():
    code = ("import sys, torch; from mflag.optim import AdamW; m = torch.nn.Linear(3, 1); o = AdamW(m.parameters(), 1e-3); "
            "m(torch.ones(2, 3)).sum().backward(); o.step(); o.zero_grad(); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
