"""How the data stages' cost grows with the corpus: time and peak memory of split, preprocess and embed_text,
and the time DVC takes to hash the dataset root, on the synthetic MIMIC corpus at several multiples of the demo's size.

MIMIC is the dataset all of them touch (pretraining reads its cache and embeddings), and its paper-scale size
is the largest of the study's (377,110 images of all views, about 217,000 of them frontal). For each factor F the corpus is
built with `synthetic.mimic.patients` x F (everything else as in params.yaml) in its own folder under
--workdir, and each stage runs as the pipeline runs it: `python stages/<stage>.py` in that folder, a fresh
process timed by GNU time (wall seconds, and the largest resident set of the process or any child it waited
for: the preprocess workers included). The hashing is `dvc add --no-commit` of the dataset root in a fresh DVC
repository (no hash cache yet): what `dvc status` / `dvc repro` pay the first time they see the folder.

    python benchmarks/scaling.py --factors 1 10 --out docs/scaling [--workdir /tmp/scaling] [--keep]
        [--stages synthesize split preprocess embed_text dvc_hash]

Writes <out>.csv (factor, images, reports, stage, seconds, max_rss_mb, disk_mb; appended to, one row per
factor and stage, a factor's earlier rows replaced) and <out>.png (seconds and peak memory against images,
log-log, every factor in the CSV), and prints the table and a per-stage linear extrapolation to the paper's
image count. Nothing of the pipeline's own outputs is touched. Measure on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("synthesize", "split", "preprocess", "embed_text", "dvc_hash")
NEEDS = {"synthesize": (), "split": ("synthesize",), "preprocess": ("split",), "embed_text": ("preprocess",),
         "dvc_hash": ("synthesize",)}  # fmt: skip
PAPER_IMAGES = 377_110  # MIMIC-CXR-JPG 2.0.0, all views: the folder DVC hashes and the reader scans (about 217,000
                        # of them frontal, what pretraining keeps; 227,827 reports)
FIELDS = ("factor", "images", "reports", "stage", "seconds", "max_rss_mb", "disk_mb")

# The synthesize stage writes all seven datasets; here only MIMIC, through the same library call.
SYNTH_MIMIC = ("from pathlib import Path; from mflag.params import load; from mflag.synth.corpus import generate; "
               "p = load('params.yaml'); generate(p.synthetic, Path(p.synthetic.out_dir), ('mimic',), progress=False)")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}


def _timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, max resident MB) of `cmd` under GNU time; stops with the output on failure."""
    report = cwd / ".time.txt"
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", "-o", str(report), *cmd], cwd=cwd, env=_env(),
                          capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: scaling: {' '.join(cmd)} failed in {cwd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report.read_text())
    return wall, int(rss.group(1)) / 1024 if rss else float("nan")


def _disk_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0


def _workspace(factor: int, workdir: Path) -> Path:
    """A folder with params.yaml (MIMIC patients x factor) and the Git-tracked MGCA-split folder the split reads."""
    wd = workdir / f"x{factor}"
    if wd.exists():
        shutil.rmtree(wd)
    wd.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["synthetic"]["mimic"]["patients"] *= factor
    (wd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(REPO / "data/mgca_splits/mimic", wd / "data/mgca_splits/mimic")
    return wd


def measure(factor: int, workdir: Path, stages: tuple[str, ...]) -> list[dict]:
    wd = _workspace(factor, workdir)
    py = sys.executable
    commands = {
        "synthesize": [py, "-c", SYNTH_MIMIC],
        "split": [py, str(REPO / "stages/split.py"), "mimic"],
        "preprocess": [py, str(REPO / "stages/preprocess.py"), "mimic"],
        "embed_text": [py, str(REPO / "stages/embed_text.py")],
    }
    disk = {"synthesize": "data/synthetic/mimic", "preprocess": "data/cache/mimic", "embed_text": "data/embeddings"}
    needed = set(stages)
    for stage in reversed(STAGES):  # a stage not asked for still runs where one asked for reads its output
        if stage in needed:
            needed |= set(NEEDS[stage])
    rows = []
    for stage in (s for s in STAGES if s in needed):
        if stage == "dvc_hash":
            hashing = wd / "hashing"  # a fresh DVC repository: no hash of any file remembered yet
            hashing.mkdir()
            subprocess.run([py, "-m", "dvc", "init", "--no-scm", "-q"], cwd=hashing, env=_env(), check=True)
            # hard links: the same files without copying them (dvc add does not follow a linked folder)
            shutil.copytree(wd / "data/synthetic/mimic", hashing / "mimic", copy_function=os.link)
            seconds, rss = _timed([py, "-m", "dvc", "add", "--no-commit", "-q", "mimic"], hashing)
        else:
            seconds, rss = _timed(commands[stage], wd)
        if stage not in stages:
            continue
        images = sum(1 for _ in (wd / "data/synthetic/mimic/files").rglob("*.jpg"))
        reports = sum(1 for _ in (wd / "data/synthetic/mimic/files").rglob("*.txt"))
        rows.append({"factor": factor, "images": images, "reports": reports, "stage": stage,
                     "seconds": round(seconds, 2), "max_rss_mb": round(rss, 1),
                     "disk_mb": round(_disk_mb(wd / disk[stage]), 1) if stage in disk else ""})  # fmt: skip
        print(f"x{factor}: {stage:10s} {images:7d} images {seconds:8.1f} s {rss:8.0f} MB", flush=True)
    return rows


def _write_csv(path: Path, rows: list[dict]) -> list[dict]:
    """Merge `rows` into the CSV at `path` (a factor measured again replaces its earlier rows); all rows."""
    old = list(csv.DictReader(path.open())) if path.is_file() else []
    new_keys = {(str(r["factor"]), r["stage"]) for r in rows}
    merged = [r for r in old if (r["factor"], r["stage"]) not in new_keys] + rows
    merged.sort(key=lambda r: (int(r["factor"]), STAGES.index(r["stage"])))
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(merged)
    os.replace(tmp, path)
    return merged


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage in STAGES:
        pts = sorted((int(r["images"]), float(r["seconds"]), float(r["max_rss_mb"])) for r in rows
                     if r["stage"] == stage)  # fmt: skip
        if not pts:
            continue
        x, t, m = zip(*pts)
        a.plot(x, t, marker="o", label=stage)
        b.plot(x, m, marker="o", label=stage)
    for ax, label in ((a, "wall seconds"), (b, "peak resident memory (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("MIMIC images in the corpus")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    a.legend(fontsize=8)
    a.set_title("time per stage")
    b.set_title("peak memory per stage")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, metadata={"Software": None})
    os.replace(tmp, path)


def extrapolate(rows: list[dict], images: int = PAPER_IMAGES) -> dict[str, float]:
    """Seconds per stage at `images`, linear in the image count from the largest measured factor."""
    out = {}
    for stage in STAGES:
        pts = [(int(r["images"]), float(r["seconds"])) for r in rows if r["stage"] == stage]
        if pts:
            n, s = max(pts)
            out[stage] = s * images / n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--out", type=Path, default=REPO / "docs/scaling", help="<out>.csv and <out>.png")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mflag-scaling"))
    ap.add_argument("--keep", action="store_true", help="keep each factor's corpus and caches")
    args = ap.parse_args()
    if any(f < 1 for f in args.factors):
        sys.exit("error: scaling: factors are whole multiples >= 1 of the demo's MIMIC size")
    print(f"cpu cores: {os.cpu_count()}; workdir {args.workdir}", flush=True)
    rows = []
    for factor in args.factors:
        rows += measure(factor, args.workdir, tuple(args.stages))
        if not args.keep:
            shutil.rmtree(args.workdir / f"x{factor}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    merged = _write_csv(args.out.with_suffix(".csv"), rows)
    _plot(args.out.with_suffix(".png"), merged)
    print(f"\n{'factor':>6s} {'images':>7s} {'stage':10s} {'seconds':>8s} {'s/1k img':>8s} {'peak MB':>8s}")
    for r in merged:
        per_k = 1000 * float(r["seconds"]) / int(r["images"])
        print(f"{r['factor']:>6} {int(r['images']):7d} {r['stage']:10s} {float(r['seconds']):8.1f} {per_k:8.2f} "
              f"{float(r['max_rss_mb']):8.0f}")  # fmt: skip
    print(f"\nlinear extrapolation to {PAPER_IMAGES:,} images (from the largest factor measured):")
    for stage, seconds in extrapolate(merged).items():
        print(f"  {stage:10s} {seconds / 3600:6.2f} h")


if __name__ == "__main__":
    main()
