"""The pretraining-seed sweep: M-FLAG minus random init on the classification jobs, per seed and precision.

For every (precision, pretraining seed) the script runs `dvc exp run` with `pretrain.seed`,
`pretrain.precision` and `finetune.precision` set, targeting only the classification entries of `mflag` and
`random` (so DVC re-runs `pretrain`, and the random-init cells once per precision, and nothing else), then
reads their cells and computes, for each job and fraction, M-FLAG minus random with the paired bootstrap
interval (mflag.stats, the same resamples as `collate`). The seeds and precisions are arguments fixed before
the run; every one is reported, none is dropped.

It works in a temporary Git clone of this repository that shares this repository's DVC cache, so the
workspace is left alone and finished stages are not recomputed; each experiment is kept (`dvc exp show` in
the clone while it lives, `--keep` to leave it). Writes a Markdown table (default docs/seed-sweep.md).

    python scripts/seed_sweep.py [--seeds 42 43 44] [--precisions bf16 fp32] [--out docs/seed-sweep.md]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mflag.collate import CollateError, read_study  # noqa: E402
from mflag.jobs import JOBS, PCTS  # noqa: E402
from mflag.params import load_or_exit  # noqa: E402

ENCODERS = {"mflag": "M-FLAG", "random": "Random"}


def _run(cwd: Path, *args: str) -> str:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(cwd)})  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"error: seed_sweep: {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout


def _targets() -> list[str]:
    return [f"finetune_cls@{j.dataset}-{e}" for j in JOBS.values() if j.task == "cls" for e in ENCODERS]


def sweep(clone: Path, seeds: list[int], precisions: list[str], level: float) -> list[dict]:
    rows = []
    for precision in precisions:
        for seed in seeds:
            print(f"seed_sweep: pretrain.seed={seed}, precision {precision} ...", flush=True)
            _run(clone, sys.executable, "-m", "dvc", "exp", "run", "-n", f"sweep-{precision}-{seed}",
                 "-S", f"pretrain.seed={seed}", "-S", f"pretrain.precision={precision}",
                 "-S", f"finetune.precision={precision}", *_targets())  # fmt: skip
            try:  # the cells as collate reads and pairs them
                study = read_study(clone / "reports/finetune", ENCODERS, level)
            except CollateError as err:
                sys.exit(f"error: seed_sweep: {err}")
            for job in (j for j, spec in JOBS.items() if spec.task == "cls"):
                for pct in PCTS:
                    d = study.diffs[(job, pct, "mflag", "random")]
                    rows.append({"precision": precision, "seed": seed, "job": job, "pct": pct, "diff": d})
                    print(f"  {job} {pct}%: {100 * d.diff:+.1f} [{_pts(d.lo)}, {_pts(d.hi)}]", flush=True)
    return rows


def _pts(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def table(rows: list[dict], level: float) -> str:
    columns = sorted({(r["job"], r["pct"]) for r in rows}, key=lambda k: (list(JOBS).index(k[0]), k[1]))
    head = [f"{JOBS[j].label} {p}%" for j, p in columns]
    lines = ["| precision | pretraining seed | " + " | ".join(head) + " | ahead |",
             "|---|---:|" + "---:|" * len(head) + "---:|"]  # fmt: skip
    for precision, seed in dict.fromkeys((r["precision"], r["seed"]) for r in rows):
        mine = {(r["job"], r["pct"]): r for r in rows if (r["precision"], r["seed"]) == (precision, seed)}
        cells, ahead = [], 0
        for key in columns:
            d = mine[key]["diff"]
            ahead += d.excludes_zero and d.diff > 0
            cells.append(f"{100 * d.diff:+.1f} [{_pts(d.lo)}, {_pts(d.hi)}]" + ("*" if d.excludes_zero else ""))
        lines.append(f"| {precision} | {seed} | " + " | ".join(cells) + f" | {ahead} of {len(columns)} |")
    return "\n".join(lines) + "\n\n" + (
        f"M-FLAG minus random init, percentage points on the test split, with the paired {100 * level:g}% "
        "bootstrap interval over test cases (the resamples `collate` uses). *: the interval excludes 0. "
        "`ahead`: columns where M-FLAG is ahead with the interval excluding 0. The random-init encoder is the "
        "same for every seed (`seed`); only the pretraining seed varies.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--out", type=Path, default=ROOT / "docs/seed-sweep.md")
    ap.add_argument("--keep", action="store_true", help="leave the temporary clone (and its experiments)")
    args = ap.parse_args()
    level = load_or_exit(ROOT / "params.yaml").stats.level
    clone = Path(tempfile.mkdtemp(prefix="seed-sweep-"))
    try:
        _run(ROOT, "git", "clone", "--quiet", str(ROOT), str(clone))
        _run(clone, sys.executable, "-m", "dvc", "cache", "dir", "--local", str(ROOT / ".dvc/cache"))
        # the committed outputs from the shared cache (what is not there is recomputed by the experiments)
        subprocess.run([sys.executable, "-m", "dvc", "checkout", "--quiet"], cwd=clone, capture_output=True)
        rows = sweep(clone, args.seeds, args.precisions, level)
    finally:
        if not args.keep:
            shutil.rmtree(clone, ignore_errors=True)
    head = ("# Pretraining-seed sweep\n\nWritten by `python scripts/seed_sweep.py "
            f"--seeds {' '.join(map(str, args.seeds))} --precisions {' '.join(args.precisions)}`.\n\n")  # fmt: skip
    args.out.write_text(head + table(rows, level))
    print(f"seed_sweep: {len(rows)} comparisons in {args.out}")


if __name__ == "__main__":
    main()
