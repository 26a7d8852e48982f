"""Seconds a fresh Python process spends importing what each kind of fine-tune cell needs.

Every one of the 42 cells is its own process, so this start-up is paid 42 times per `dvc repro`.
Run:  python benchmarks/cell_startup.py [--repeats N]
Each figure is the median wall time of N fresh interpreters running only the imports (the first,
cold-cache run is discarded). `torch` alone is the floor; torchvision is shown for comparison (the
cells do not import it; segmentation cells used to, through segmentation-models-pytorch, until the
U-Net was written out in mflag/finetune/unet.py).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

IMPORTS = {
    "python only": "pass",
    "torch": "import torch",
    "torch + torchvision": "import torch, torchvision",
    "classification cell": "import stages.finetune, mflag.finetune.classify",
    "detection cell": "import stages.finetune, mflag.finetune.detect",
    "segmentation cell": "import stages.finetune, mflag.finetune.segment",
    # what the cells no longer pay: DVCLive opens the DVC repository when it starts (mflag.live writes its files)
    "dvclive.Live()": "import dvclive; dvclive.Live('/tmp/cell_startup_live', dvcyaml=False, save_dvc_exp=False)",
    # torch.optim loads torch._dynamo when an optimizer is built; the cells use mflag.optim instead
    "torch + torch.optim.AdamW": "import torch; torch.optim.AdamW(torch.nn.Linear(2, 1).parameters())",
    "torch + mflag.optim.AdamW": "import torch, mflag.optim; mflag.optim.AdamW(torch.nn.Linear(2, 1).parameters(), 1e-3)",
}


def seconds(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{'imports':26s} {'median s':>9s}   (of {args.repeats} runs)")
    for name, code in IMPORTS.items():
        seconds(code)  # warm the page cache
        runs = [seconds(code) for _ in range(args.repeats)]
        print(f"{name:26s} {statistics.median(runs):9.2f}   {' '.join(f'{r:.2f}' for r in runs)}")


if __name__ == "__main__":
    main()
