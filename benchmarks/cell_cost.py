"""What the fine-tune cells cost at the paper's sizes, against the pretraining step.

Counts the floating-point operations of one image on each path, at configs/paper.yaml's sizes, with PyTorch's
own op counter (torch.utils.flop_counter.FlopCounterMode: convolutions and matrix products; the elementwise
rest is small):

  pretrain  M-FLAG's step: the ResNet-50 trunk forward and backward on a 224 crop, both projectors (the text
            side a cached embedding, CXR-BERT's 768 dimensions), the loss
  cls       the frozen encoder's forward on a 224 crop (the protocol augments, so every epoch); the probe ~0
  seg       the frozen encoder's forward at 224 and the U-Net decoder's forward and backward (smp's decoder)
  det       the frozen layers 1-4 forward at 224 and the YOLOv3 neck and head's forward and backward

and turns them into GPU time at the rate the pretraining step reached where it was measured
(``--pretrain-ips``: images per second of this pipeline's step; default 3,519, one H100 at batch 512,
docs/gpu.md). That is an estimate: it assumes every path runs at the pretraining step's efficiency (a
forward-only encoder pass usually runs faster, a small head slower). Per cell it prints the GPU-seconds of one
epoch over 1,000 training images plus a validation pass over 1,000 images, which a user multiplies by their
split sizes and epochs. With ``--time`` it also times each path on ``--device`` (``--steps`` steps after one
warm-up) and prints images per second: on a GPU that replaces the estimate with a measurement
(scripts/device_checks.sh runs it).

    python benchmarks/cell_cost.py [--pretrain-ips 3519] [--time --device cuda --batch 64 --steps 10]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from mflag.finetune.detect import build_detector, yolo_loss
from mflag.finetune.segment import build_unet, segmentation_loss
from mflag.losses import alignment_loss, orthogonality_loss
from mflag.models import MFLAG, resnet50_trunk

SIZE = 224  # configs/paper.yaml: pretrain.crop, finetune.cls.crop, finetune.seg.input_size, finetune.det.input_size
TEXT_DIM = 768  # CXR-BERT's hidden size
PROJ_HIDDEN, PROJ_DIM = 2048, 1024  # the reference projectors


def _pretrain(device: torch.device) -> Callable[[int], None]:
    model = MFLAG(resnet50_trunk(), TEXT_DIM, PROJ_HIDDEN, PROJ_DIM).to(device).train()

    def run(b: int) -> None:
        x = torch.randn(b, 3, SIZE, SIZE, device=device)
        t = torch.randn(b, TEXT_DIM, device=device)
        out = model(x, t)
        (alignment_loss(out.z_img, out.z_txt) + orthogonality_loss(out.h_img, 0.0051)).backward()  # reference weights

    return run


def _cls(device: torch.device) -> Callable[[int], None]:
    trunk = resnet50_trunk().to(device).eval()

    def run(b: int) -> None:
        with torch.no_grad():
            trunk(torch.randn(b, 3, SIZE, SIZE, device=device))

    return run


def _seg(device: torch.device) -> Callable[[int], None]:
    model = build_unet(resnet50_trunk().state_dict()).to(device)
    model.train()  # smp's freeze keeps the encoder in eval and without gradients

    def run(b: int) -> None:
        logits = model(torch.randn(b, 3, SIZE, SIZE, device=device))
        segmentation_loss(logits, (torch.rand(b, 1, SIZE, SIZE, device=device) > 0.9).float()).backward()

    return run


def _det(device: torch.device) -> Callable[[int], None]:
    model = build_detector(resnet50_trunk().state_dict(), seed=0).to(device)
    model.train()  # the neck and head train; YoloDetector keeps its frozen trunk in eval

    def run(b: int) -> None:
        boxes = [np.array([[40.0, 50.0, 120.0, 150.0]], np.float32)] * b
        loss, _ = yolo_loss([o.float() for o in model(torch.randn(b, 3, SIZE, SIZE, device=device))], boxes, SIZE)
        loss.backward()

    return run


PATHS = {  # name: (builder of a run(batch) function, what it computes)
    "pretrain": (_pretrain, "M-FLAG step: trunk forward + backward, projectors, loss"),
    "cls": (_cls, "frozen encoder forward (augmented crops: every epoch)"),
    "seg": (_seg, "frozen encoder forward + U-Net decoder forward and backward"),
    "det": (_det, "frozen layers 1-4 forward + YOLOv3 neck/head forward and backward"),
}


def flops_per_image(build: Callable, device: torch.device, batch: int = 2) -> float:
    """Operations of one image on the path (the mean over a batch of `batch`; batch norm needs two)."""
    run = build(device)
    counter = FlopCounterMode(display=False)
    with counter:
        run(batch)
    return counter.get_total_flops() / batch


def images_per_second(build: Callable, device: torch.device, batch: int, steps: int) -> float:
    run = build(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        run(batch)  # warm-up: allocations, kernel selection
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            run(batch)
        sync()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrain-ips", type=float, default=3519.0,
                    help="images per second of the pretraining step where it was measured (docs/gpu.md)")
    ap.add_argument("--time", action="store_true", help="also time each path on --device")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    flops = {name: flops_per_image(build, torch.device("cpu")) for name, (build, _) in PATHS.items()}
    encoder = flops["cls"]  # the frozen encoder's forward
    # a validation image: the encoder's forward and the head's (a third of the head's forward + backward)
    valid = {name: encoder + (flops[name] - encoder) / 3 for name in ("cls", "seg", "det")}
    rate = flops["pretrain"] * args.pretrain_ips  # operations per second the pretraining step achieved
    print(f"operations per image at {SIZE} px (FlopCounterMode); GPU-seconds at the pretraining step's rate "
          f"({args.pretrain_ips:,.0f} img/s x {flops['pretrain'] / 1e9:.1f} GFLOP = {rate / 1e12:.1f} TFLOP/s):")
    print(f"{'path':9s} {'GFLOP/img':>10s} {'valid GFLOP':>11s} {'x pretrain':>10s} {'GPU-s: 1k train + 1k valid':>27s}  what")
    for name, (_, what) in PATHS.items():
        per_epoch = 1000 * flops[name] + 1000 * valid.get(name, 0.0)
        v = f"{valid[name] / 1e9:11.2f}" if name in valid else f"{'-':>11s}"
        print(f"{name:9s} {flops[name] / 1e9:10.2f} {v} {flops[name] / flops['pretrain']:10.2f} "
              f"{per_epoch / rate:27.2f}  {what}")
    if args.time:
        print(f"measured on {device} (bf16 autocast, batch {args.batch}, {args.steps} steps after one warm-up):")
        for name, (build, _) in PATHS.items():
            print(f"{name:9s} {images_per_second(build, device, args.batch, args.steps):10.1f} img/s", flush=True)


if __name__ == "__main__":
    main()
