"""Seconds a fresh Python process spends importing the libraries the stages use, and each stage's imports.

Every stage run is its own process (the 14 fine-tune stages too), so this start-up is paid once per stage
process in a `dvc repro`. It is measured here to know what it costs, not to avoid it: the stages use the
field's libraries (torchvision's ResNet-50, segmentation-models-pytorch's U-Net, DVCLive, torch.optim,
scikit-learn).

Run from anywhere:  python benchmarks/cell_startup.py [--repeats N]
Each figure is the median wall time of N fresh interpreters running only the given code (one warm-up run
first, so the page cache is warm). `python only` is the interpreter's own floor; the library rows are
cumulative over `torch` where they need it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LIBRARIES = {
    "python only": "pass",
    "torch": "import torch",
    "torch + torchvision": "import torch, torchvision",
    "segmentation_models_pytorch": "import segmentation_models_pytorch",
    "sklearn.metrics": "import sklearn.metrics",
    "dvclive (import)": "import dvclive",
    # opening the logger also opens the DVC repository it runs in (the stages' mflag.io.open_live)
    "dvclive: open_live()": "from mflag.io import open_live; open_live({live!r})",
    # building a torch.optim optimizer loads torch._dynamo
    "torch.optim.AdamW()": "import torch; torch.optim.AdamW(torch.nn.Linear(2, 1).parameters())",
    "torchvision resnet50 trunk": "from mflag.models import resnet50_trunk; resnet50_trunk()",
}
STAGES = {
    "stage init_random": "import stages.init_random",
    "stage pretrain": "import stages.pretrain",
    "stage finetune": "import stages.finetune",
    "cell: classification": "import stages.finetune, mflag.finetune.classify",
    "cell: detection": "import stages.finetune, mflag.finetune.detect",
    "cell: segmentation": "import stages.finetune, mflag.finetune.segment",
}


def seconds(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'imports':30s} {'median s':>9s}   (of {args.repeats} runs)")
        for name, code in (LIBRARIES | STAGES).items():
            code = code.format(live=str(Path(tmp) / "live"))
            try:
                seconds(code)  # warm the page cache
            except subprocess.CalledProcessError:
                print(f"{name:30s} {'failed':>9s}   ({code})")
                continue
            runs = [seconds(code) for _ in range(args.repeats)]
            print(f"{name:30s} {statistics.median(runs):9.2f}   {' '.join(f'{r:.2f}' for r in runs)}", flush=True)


if __name__ == "__main__":
    main()
