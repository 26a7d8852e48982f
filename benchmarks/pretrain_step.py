"""Images per second of one pretraining step, three ways, on every available device:

(a) this pipeline: batches gathered from a uint8 memory map by a reader thread, moved to the device,
    augmented there as whole batches, cached text embeddings, the M-FLAG step (AMP on CUDA);
(b) the compute bound: the same model step on batches already on the device (no loading, no augmentation);
(c) the reference design: reports tokenised to 512 tokens and run through a frozen BERT-base-sized LM
    (CXR-BERT's configuration, random weights) at every step, per-sample PIL augmentation in
    DataLoader worker processes.

Prints each figure, a/c and a/b.  Example (GPU, the reference sizes):
    python benchmarks/pretrain_step.py --device cuda --batch 512 --size 256 --crop 224 --workers 8
CPU (small, it is slow):  python benchmarks/pretrain_step.py --device cpu --batch 16 --size 64 --crop 56 --steps 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from mflag.augment import AugmentSpec, reference_pil_transform
from mflag.distributed import DistEnv
from mflag.losses import alignment_loss, orthogonality_loss
from mflag.models import MFLAG, resnet50_trunk
from mflag.pretrain import PretrainData, TrainConfig, batch_stream, make_optimizer, train_step
from mflag.augment import augment_batch

REPORT = (
    "FINDINGS: PA and lateral views of the chest were obtained. There is a moderate right pleural effusion "
    "with adjacent atelectasis. The cardiomediastinal silhouette is normal. No pneumothorax. "
    "IMPRESSION: Moderate right pleural effusion. Possible early pneumonia in the right lower lobe. "
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _config(args, precision: str) -> TrainConfig:
    return TrainConfig(
        epochs=1, batch_size=args.batch, lr=2e-5, weight_decay=0.05, betas=(0.9, 0.999), restart_fraction=0.4,
        eta_min=1e-8, precision=precision, channels_last=True, workers=args.workers,
        augment=AugmentSpec(crop=args.crop, rotation=(0.0, 90.0), perspective_p=0.5, perspective_distortion=0.5,
                            autocontrast_p=0.5),
        ortho_weight=1.0, ortho_offdiag_weight=0.0051, ortho_on="backbone", seed=0, log_every=10**9,
    )  # fmt: skip


def _timed(fn, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return time.perf_counter() - start


def bench_device(args, device: torch.device, images_u8: np.ndarray) -> dict:
    precision = "bf16" if device.type == "cuda" or args.cpu_bf16 else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else None
    cfg = _config(args, precision)
    n = len(images_u8)
    text_emb = np.random.default_rng(0).normal(size=(n, 768)).astype(np.float32)
    data = PretrainData(images_u8, text_emb, np.arange(n), np.arange(0), [""] * n)
    torch.manual_seed(0)
    model = MFLAG(resnet50_trunk(), 768, 2048, 1024).to(device).to(memory_format=torch.channels_last)
    opt, _ = make_optimizer(model, cfg, 1000)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    total = args.steps + args.warmup
    batches = [np.random.default_rng(i).choice(n, args.batch, replace=False) for i in range(total)]
    gen = torch.Generator().manual_seed(0)

    # (a) the pipeline: reader thread -> device -> batched augmentation -> step (timed after the warm-up
    # batches, like (b) and (c): the first steps pay for CUDA's and cuDNN's start-up)
    def run_a(rows):
        for img_u8, txt in batch_stream(data, rows, args.workers, pin=device.type == "cuda"):
            img = augment_batch(img_u8.to(device, non_blocking=True), cfg.augment, gen)
            train_step(model, opt, scaler, img.contiguous(memory_format=torch.channels_last), txt.to(device), cfg, dtype)

    run_a(batches[: args.warmup])
    _sync(device)
    t0 = time.perf_counter()
    run_a(batches[args.warmup :])
    _sync(device)
    a = args.batch * args.steps / (time.perf_counter() - t0)

    # (b) compute bound: fixed batch already on the device
    img = augment_batch(torch.from_numpy(np.array(images_u8[: args.batch])).to(device), cfg.augment, gen)
    img = img.contiguous(memory_format=torch.channels_last)
    txt = torch.from_numpy(text_emb[: args.batch]).to(device)
    b = args.batch * args.steps / _timed(lambda: train_step(model, opt, scaler, img, txt, cfg, dtype), args.steps, args.warmup, device)

    # (c) the reference design: tokenise + BERT-base LM every step, PIL augmentation in worker processes
    c = bench_reference(args, device, images_u8, dtype)
    return {"device": str(device), "precision": precision, "a": a, "b": b, "c": c}


class _PilDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, spec: AugmentSpec):
        self.images, self.transform = images, reference_pil_transform(spec)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        torch.set_num_threads(1)  # one thread per worker, as DataLoader workers run
        return self.transform(Image.fromarray(np.asarray(self.images[i]))), REPORT


def bench_reference(args, device: torch.device, images_u8: np.ndarray, dtype) -> float:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mflag.text import DEFAULT_LM, resolve_lm_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_lm_path(args.tokenizer or DEFAULT_LM))  # BERT uncased vocab
    config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512)  # CXR-BERT-general's shape
    lm = BertModel(config).to(device).eval().requires_grad_(False)
    cfg = _config(args, "bf16" if dtype is not None else "fp32")
    torch.manual_seed(0)
    model = MFLAG(resnet50_trunk(), 768, 2048, 1024).to(device)
    opt, _ = make_optimizer(model, cfg, 1000)
    loader = torch.utils.data.DataLoader(
        _PilDataset(images_u8, cfg.augment), batch_size=args.batch, shuffle=True, num_workers=args.workers,
        drop_last=True, persistent_workers=args.workers > 0,
    )  # fmt: skip
    total, seen, start = args.steps + args.warmup, 0, None
    it = iter(loader)
    for i in range(total):
        if i == args.warmup:
            _sync(device)
            start, seen = time.perf_counter(), 0
        try:
            img, texts = next(it)
        except StopIteration:
            it = iter(loader)
            img, texts = next(it)
        tok = tokenizer(list(texts), padding="max_length", truncation=True, max_length=512, return_tensors="pt")
        img = img.to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            with torch.no_grad():
                t_emb = lm(input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device))
                t_emb = t_emb.last_hidden_state[:, 0].float()
            h, z_img = model.encode_image(img)
            loss = alignment_loss(z_img, model.encode_text(t_emb)) + orthogonality_loss(h, 0.0051)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(img)
    _sync(device)
    return seen / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", action="append", help="cpu and/or cuda (default: both where available)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64, help="side of the cached uint8 images")
    ap.add_argument("--crop", type=int, default=56)
    ap.add_argument("--images", type=int, default=0, help="images in the memory map (default: 4 batches)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="reader threads (a) / DataLoader workers (c)")
    ap.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on CPU too")
    ap.add_argument("--tokenizer", help="folder with a BERT-uncased tokenizer for (c) (default: the shipped LM's)")
    args = ap.parse_args()
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    n = args.images or 4 * args.batch
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "images.npy"
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, args.size, args.size))
        mm[:] = rng.integers(0, 256, size=mm.shape, dtype=np.uint8)
        mm.flush()
        images = np.load(path, mmap_mode="r")
        print(f"batch {args.batch}, images {args.size}->{args.crop}, steps {args.steps}, workers {args.workers}, "
              f"cpu threads {torch.get_num_threads()}, cores {os.cpu_count()}")  # fmt: skip
        for name in devices:
            r = bench_device(args, torch.device(name), images)
            print(f"[{r['device']}, {r['precision']}] (a) pipeline {r['a']:.1f} img/s | (b) compute bound "
                  f"{r['b']:.1f} img/s | (c) reference design {r['c']:.1f} img/s | a/c {r['a'] / r['c']:.2f} | "
                  f"a/b {r['a'] / r['b']:.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
