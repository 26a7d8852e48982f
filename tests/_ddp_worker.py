"""Run by torchrun in tests/test_pretrain.py: one DDP training step of a tiny model, rank 0 saves it."""

import sys

import torch

from mflag import distributed
from mflag.pretrain import train
from tests.test_pretrain import ddp_case, tiny_model

env = distributed.init("cpu")
torch.set_num_threads(1)
model = tiny_model()
cfg, data = ddp_case()
train(model, data, cfg, env, resume_path=__import__("pathlib").Path(sys.argv[1]) / "resume.pt",
      fingerprint="ddp", progress=False)  # fmt: skip
if env.is_main:
    torch.save(model.state_dict(), sys.argv[1] + "/ddp_state.pt")
distributed.shutdown(env)
