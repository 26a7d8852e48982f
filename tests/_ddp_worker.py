"""Run by torchrun in tests/test_pretrain.py: one DDP training step of a tiny model, rank 0 saves it.

argv: OUT_DIR [cpu|cuda] [forever].  On CUDA with fewer GPUs than ranks (a one-GPU machine) every rank uses cuda:0
and the gradients are averaged over gloo, which takes CUDA tensors; with a GPU per rank it is NCCL, as
the pipeline runs. `forever`: each rank writes its pid to OUT_DIR/worker<rank>.pid and trains until it is
killed (tests/test_pretrain_safety.py stops torchrun and checks that its workers stop too).
"""

import os
import sys

import torch

from mflag import distributed
from mflag.pretrain import train
from tests.test_pretrain import ddp_case, tiny_model

kind = sys.argv[2] if len(sys.argv) > 2 else "cpu"
forever = sys.argv[3:4] == ["forever"]
if kind == "cuda":
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if torch.cuda.device_count() < int(os.environ["WORLD_SIZE"]):
        os.environ["LOCAL_RANK"] = "0"
        torch.distributed.init_process_group("gloo")  # distributed.init() keeps a group already joined
env = distributed.init(kind)
torch.set_num_threads(1)
model = tiny_model()
cfg, data = ddp_case()
if forever:
    import dataclasses
    from pathlib import Path

    cfg = dataclasses.replace(cfg, epochs=10**9)
    Path(sys.argv[1], f"worker{env.rank}.pid").write_text(str(os.getpid()))
train(model, data, cfg, env, resume_path=__import__("pathlib").Path(sys.argv[1]) / "resume.pt",
      fingerprint="ddp", progress=False)  # fmt: skip
if env.is_main:
    torch.save(model.state_dict(), sys.argv[1] + "/ddp_state.pt")
distributed.shutdown(env)
