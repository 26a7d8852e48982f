"""Per-step training curves in DVCLive's on-disk layout, without importing DVC."""

from __future__ import annotations

import json
import math
import numbers
import shutil
from pathlib import Path

from mflag.io import atomic_write


class StepLog:
    """Metric curves of one run, in DVCLive's on-disk layout, without importing DVC.

    A stage logs its curves into a folder that dvc.yaml declares as an output and as plots:

    - ``plots/metrics/<name>.tsv``: one file per metric (``train/align`` -> ``plots/metrics/train/align.tsv``),
      tab-separated, header ``step<TAB><last part of the name>``, one row per logged value;
    - ``metrics.json``: the latest value of every metric, nested by the parts of its name, then ``step``.

    These are the files ``dvclive.Live(dir, dvcyaml=False, save_dvc_exp=False)`` writes (DVCLive 3.x), so
    ``dvc plots show`` and ``dvc metrics show`` read them the same way. DVCLive itself opens the DVC repository
    when it starts (about a second per stage process, 43 times in a ``dvc repro``), which this does not need.

    Starting one clears what an earlier run left in ``folder``.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.step = 0
        self.summary: dict = {}
        self._stepped = False  # DVCLive writes `step` into the summary only once a step has closed
        self._started: set[str] = set()
        shutil.rmtree(self.folder / "plots" / "metrics", ignore_errors=True)
        (self.folder / "metrics.json").unlink(missing_ok=True)

    def log_metric(self, name: str, value: float | int) -> None:
        """Append ``value`` at the current step to ``name``'s curve; NaN and infinities are written as text."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"metric {name!r}: a number is needed, got {type(value).__name__}")
        if not isinstance(value, numbers.Integral):
            value = float(value)  # numpy scalars too: JSON and the TSV both get Python's float repr
            if not math.isfinite(value):
                value = str(value)
        parts = name.split("/")
        path = self.folder / "plots" / "metrics" / f"{name}.tsv"
        if name not in self._started:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"step\t{parts[-1]}\n", encoding="utf-8")
            self._started.add(name)
        with path.open("a", encoding="utf-8") as f:
            f.write(f"{self.step}\t{value}\n")
        node = self.summary
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def next_step(self) -> None:
        """Close the current step: write the summary, then count on."""
        self._stepped = True
        self._write_summary()
        self.step += 1

    def end(self) -> None:
        """Write the final summary (with the step of the last completed step, as DVCLive does)."""
        if "step" in self.summary:
            self.step = self.summary["step"]
        self._write_summary()

    def _write_summary(self) -> None:
        if self._stepped:
            self.summary["step"] = self.step
        atomic_write(self.folder / "metrics.json", json.dumps(self.summary, indent=4) + "\n")
