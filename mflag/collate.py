"""Collation: every fine-tuning cell and both pretraining runs into paper-style tables, plots and claims.

Inputs are the cells' ``metrics.json`` and ``bootstrap.csv`` (one per job x fraction x encoder of params
``encoders``), the pretraining metrics, CSVs and timings of M-FLAG and of the ConVIRT-style baseline, the
reference figures (``references/paper_reference.yaml``, percent) and the paper configuration
(``configs/paper.yaml``). Everything written is small and deterministic except what claim (d) quotes from the
timing files (sorted, no time stamps, PNGs without a software tag) and meant for Git:

* ``metrics.json``: ``{job: {encoder: {pct<p>: {...}}}, "pretrain": {...}, "pretrain_convirt": {...}}``; per
  cell the job's metric (a fraction, rounded by ``mflag.io.rounded``; null where not evaluable), its bootstrap
  interval ``<metric>_lo`` / ``<metric>_hi``, ``<metric>_sd`` where the cell averages several probe seeds,
  and for every other encoder ``vs_<other>: {<metric>_diff, <metric>_diff_lo, <metric>_diff_hi}`` (this
  encoder minus the other, paired over the same test resamples).
* ``tables/{classification,segmentation,detection}.{md,tex,csv}``: one row per encoder, columns dataset x
  1 % / 10 % / 100 %, the value in percent and its interval; then the reference rows. Bold: the highest value
  per column. ``tables/<table>_differences.{md,csv}``: every pair of encoders, the paired difference and its
  interval, marked ``*`` where the interval excludes 0.
* ``tables/pretraining.{md,tex,csv}``: losses, retrieval, feature geometry and parameter counts of both runs.
* ``plots/fraction/<job>.csv`` (``pct,encoder,value,lo,hi``, fractions), ``plots/fraction.png`` (with the
  intervals), ``plots/losses.png``, ``plots/spectrum.png``.
* ``claims.md``: the paper's headline claims, each supported, not supported or not evaluable, with the figures
  and intervals behind the verdict.

Every cell file must be strict JSON: a ``NaN`` or ``Infinity`` token is an error naming the file.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from mflag.io import atomic_write, rounded, write_json
from mflag.jobs import JOBS, PCTS, TASK_TABLES, cell_name
from mflag.stats import interval, paired_difference


class CollateError(ValueError):
    """An input that breaks its contract (names the file)."""


TABLES = tuple(TASK_TABLES.values())
METRIC_LABELS = {"auc": "AUC", "acc": "ACC", "dice": "Dice", "map": "mAP"}
PAPER_REDUCTION = 0.78  # "reduces the number of parameters by 78%" (abstract)
REDUCTION_TOLERANCE = 0.02  # fraction points: rounding, and the LM's own size differing slightly

Key = tuple[str, int, str]  # (job, pct, encoder)
Cells = dict[Key, float | None]  # the job's metric, a fraction; None: not evaluable
Reasons = dict[Key, str]  # why a cell's metric is not evaluable
Spreads = dict[Key, tuple[float, int]]  # (SD over probe seeds, number of seeds)


@dataclass(frozen=True)
class Diff:
    """Encoder a minus encoder b in one (job, fraction) or across two cells: the point difference and its
    paired bootstrap interval (None where too few resamples are defined)."""

    diff: float
    lo: float | None
    hi: float | None

    @property
    def excludes_zero(self) -> bool:
        return self.lo is not None and self.hi is not None and (self.lo > 0 or self.hi < 0)


REF_KINDS = ("published", "independent")  # the authors' own figures | an independent re-evaluation of M-FLAG


@dataclass(frozen=True)
class RefRow:
    key: str
    label: str
    source: str
    protocol: str
    values: dict[tuple[str, int], float]  # (job, pct) -> percent
    kind: str = "published"  # REF_KINDS, or "floor" (the constant predictor)
    metric: str | None = None  # None: the jobs' own metrics (a table row); else another metric (a note, no row)


@dataclass
class Study:
    """Everything read from the cells, with the intervals and paired differences derived from them."""

    encoders: dict[str, str]  # name -> label, in params order
    cells: Cells
    reasons: Reasons = field(default_factory=dict)
    spreads: Spreads = field(default_factory=dict)
    replicates: dict[Key, np.ndarray] = field(default_factory=dict)
    level: float = 0.95
    intervals: dict[Key, tuple[float | None, float | None]] = field(default_factory=dict)
    diffs: dict[tuple[str, int, str, str], Diff] = field(default_factory=dict)  # (job, pct, a, b)
    trivial: dict[tuple[str, int], float] = field(default_factory=dict)  # (job, pct) -> a constant predictor's score

    def __post_init__(self) -> None:
        for key, reps in self.replicates.items():
            if self.cells.get(key) is not None:
                self.intervals[key] = tuple(None if x is None else rounded(x) for x in interval(reps, self.level))
        for job in JOBS:
            for pct in PCTS:
                for a, b in itertools.permutations(self.encoders, 2):
                    d = self.paired(job, pct, a, job, pct, b)
                    if d is not None:
                        self.diffs[(job, pct, a, b)] = d

    def paired(self, job_a: str, pct_a: int, a: str, job_b: str, pct_b: int, b: str) -> Diff | None:
        """Cell (job_a, pct_a, a) minus cell (job_b, pct_b, b), paired over the same test resamples; None where
        either is missing or not evaluable."""
        ka, kb = (job_a, pct_a, a), (job_b, pct_b, b)
        va, vb = self.cells.get(ka), self.cells.get(kb)
        if va is None or vb is None:
            return None
        lo = hi = None
        if ka in self.replicates and kb in self.replicates:
            lo, hi = paired_difference(self.replicates[ka], self.replicates[kb], self.level)
        return Diff(rounded(va - vb), lo if lo is None else rounded(lo), hi if hi is None else rounded(hi))

    def missing(self) -> list[str]:
        return [cell_name(j, p, e) for e in self.encoders for j in JOBS for p in PCTS if (j, p, e) not in self.cells]


# ------------------------------------------------------------------------------------------ read
def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _load_json(path: Path):
    """Strict JSON: a NaN or Infinity token (which Python's json reads by default) is an error naming the file."""

    def reject(token: str):
        raise CollateError(f"{path}: `{token}` is not valid JSON (an undefined metric is written as null with "
                           "its `not_evaluable` reason)")  # fmt: skip

    try:
        return json.loads(path.read_text(), parse_constant=reject)
    except json.JSONDecodeError as err:
        raise CollateError(f"{path}: not valid JSON ({err})") from None


def _cell_records(finetune_dir: str | Path, encoders):
    """(job, pct, encoder, path, record) of every cell of the listed encoders present under `finetune_dir`
    (<job>-<pct>-<encoder>/metrics.json), each checked to be JSON whose job, pct and encoder match its folder.
    Folders of encoders no longer listed (an earlier experiment's) are not read."""
    for job in JOBS:
        for pct in PCTS:
            for enc in encoders:
                path = Path(finetune_dir) / cell_name(job, pct, enc) / "metrics.json"
                if not path.is_file():
                    continue
                rec = _load_json(path)
                for key, want in (("job", job), ("pct", pct), ("encoder", enc)):
                    if rec.get(key) != want:
                        raise CollateError(f"{path}: `{key}` is {rec.get(key)!r}, the folder name says {want!r}")
                yield job, pct, enc, path, rec


def _reason(path: Path, rec: dict, metric: str) -> str | None:
    """The `not_evaluable` reason of a cell whose metric is null (None where the metric is a number)."""
    value, reason = rec.get(metric), rec.get("not_evaluable")
    if value is None and metric in rec:
        if not isinstance(reason, str) or not reason.strip():
            raise CollateError(f"{path}: `{metric}` is null without a `not_evaluable` reason")
        return reason.strip()
    if not _number(value):
        raise CollateError(f"{path}: `{metric}` must be a finite number, or null with a `not_evaluable` reason, "
                           f"got {value!r}")  # fmt: skip
    return None


def _spread(path: Path, rec: dict, metric: str) -> tuple[float, int] | None:
    sd, seeds = rec.get(f"{metric}_sd"), rec.get("seeds")
    if rec.get(metric) is None or (sd is None and seeds is None):
        return None  # a metric not evaluable (its SD is null too), or a single run
    if not _number(sd) or not isinstance(seeds, list) or len(seeds) < 2:
        raise CollateError(f"{path}: `{metric}_sd` must be a finite number and `seeds` a list of two or more, "
                           f"got {sd!r} and {seeds!r}")  # fmt: skip
    return rounded(float(sd)), len(seeds)


def _read_bootstrap(path: Path, metric: str, resamples) -> np.ndarray:
    """bootstrap.csv: a header naming the metric, then one value per resample (empty: undefined on it)."""
    if not path.is_file():
        raise CollateError(f"{path}: not found (every cell writes its bootstrap replicates next to metrics.json)")
    lines = path.read_text().splitlines()
    if not lines or lines[0] != metric or len(lines) - 1 != resamples:
        raise CollateError(f"{path}: must hold the header `{metric}` and {resamples} lines (the cell's "
                           f"`bootstrap.resamples`), got {len(lines) - 1 if lines else 0}")  # fmt: skip
    try:
        reps = np.array([float(v) if v else math.nan for v in lines[1:]])
    except ValueError as err:
        raise CollateError(f"{path}: not a number: {err}") from None
    if np.isinf(reps).any():
        raise CollateError(f"{path}: infinite values")
    return reps


def read_study(finetune_dir: str | Path, encoders: dict[str, str], level: float) -> Study:
    """Every cell of the listed `encoders` (name -> label) under `finetune_dir`, with its replicates; cells of one
    job must share their test cases and resamples (``test_set``, ``bootstrap``) to be paired."""
    cells: Cells = {}
    reasons: Reasons = {}
    spreads: Spreads = {}
    reps: dict[Key, np.ndarray] = {}
    design: dict[str, tuple[Path, tuple]] = {}  # job -> (first cell's file, its test set and resamples)
    trivial: dict[tuple[str, int], float] = {}
    for job, pct, enc, path, rec in _cell_records(finetune_dir, encoders):
        metric = JOBS[job].metric
        if "trivial" in rec:  # the same test cases and train subset for every encoder: any cell's value
            if not _number(rec["trivial"]):
                raise CollateError(f"{path}: `trivial` must be a finite number, got {rec['trivial']!r}")
            trivial.setdefault((job, pct), rounded(float(rec["trivial"])))
        reason = _reason(path, rec, metric)
        cells[(job, pct, enc)] = None if reason else rounded(float(rec[metric]))
        if reason:
            reasons[(job, pct, enc)] = reason
        spread = _spread(path, rec, metric)
        if spread:
            spreads[(job, pct, enc)] = spread
        boot = rec.get("bootstrap")
        if not isinstance(boot, dict) or not isinstance(boot.get("resamples"), int) or "test_set" not in rec:
            raise CollateError(f"{path}: needs `test_set` and `bootstrap` {{resamples, seed, key}} (written by "
                               "stages/finetune.py)")  # fmt: skip
        mine = (rec["test_set"], boot["resamples"], boot.get("seed"), boot.get("key"))
        first = design.setdefault(job, (path, mine))
        if first[1] != mine:
            raise CollateError(f"{path} and {first[0]}: scored on other test cases or resamples (test_set, bootstrap "
                               f"{mine} vs {first[1]}), so they cannot be paired; re-run the job's cells")  # fmt: skip
        reps[(job, pct, enc)] = _read_bootstrap(path.with_name("bootstrap.csv"), metric, boot["resamples"])
    return Study(encoders, cells, reasons, spreads, reps, level, trivial=trivial)


TRIVIAL_NOTE = ("the same test cases scored by a model that learned nothing: classification a constant score "
                "(AUC 50) or the training subset's most frequent class (accuracy); segmentation empty masks "
                "(Dice is the share of test images without a mask); detection no box (mAP 0)")


def trivial_row(study: Study) -> RefRow | None:
    """The constant predictor's scores as a reference row of the tables and plots (None: no cell wrote one)."""
    if not study.trivial:
        return None
    values = {k: rounded(100 * v) for k, v in study.trivial.items()}
    return RefRow("trivial", "Constant predictor", "this run's test cases", TRIVIAL_NOTE, values, "floor")


def read_pretrain(path: str | Path) -> dict[str, float]:
    """The scalar entries of a pretraining metrics file, rounded (non-numeric ones, null included, left out)."""
    rec = _load_json(Path(path))
    dotted = [k for k in rec if "." in k]
    if dotted:
        raise CollateError(f"{path}: metric keys may not contain dots: {', '.join(dotted)}")
    return {k: rounded(v) for k, v in rec.items() if _number(v)}


def read_columns(path: str | Path) -> dict[str, list[float]]:
    """A numeric CSV as columns."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise CollateError(f"{path}: no rows")
    return {k: [float(r[k]) for r in rows] for k in rows[0]}


LM_KEYS = ("name", "layers", "hidden_size", "heads", "intermediate_size", "parameters")


def read_language_model(path: str | Path) -> dict:
    """paper_reference.yaml's `paper_language_model`: the facts claim (a) counts the paper configuration from."""
    lm = (yaml.safe_load(Path(path).read_text()) or {}).get("paper_language_model")
    if not isinstance(lm, dict) or set(lm) != set(LM_KEYS) or not all(_number(lm[k]) for k in LM_KEYS[1:]):
        raise CollateError(f"{path}: `paper_language_model` must hold {', '.join(LM_KEYS)} (numbers but the name)")
    return lm


def read_reference(path: str | Path) -> list[RefRow]:
    """paper_reference.yaml: `rows`, each {key, label, kind, source, protocol, values: {job: {pct<p>: percent}}}
    and optionally `metric` (a metric other than the jobs' own: the values become a note, never a table row)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    rows = []
    required = {"key", "label", "kind", "source", "protocol", "values"}
    for i, row in enumerate(raw.get("rows") or []):
        where = f"{path}: rows[{i}]"
        if not isinstance(row, dict) or not required <= set(row) or set(row) - required - {"metric"}:
            raise CollateError(f"{where} must hold key, label, kind, source, protocol and values, and may hold metric")
        if row["kind"] not in REF_KINDS:
            raise CollateError(f"{where}.kind: one of {', '.join(REF_KINDS)}, got {row['kind']!r}")
        metric = row.get("metric")
        if metric is not None and (not isinstance(metric, str) or not metric.strip()):
            raise CollateError(f"{where}.metric: the name of the metric the values are in (e.g. F1), or absent")
        values = {}
        for job, entry in (row["values"] or {}).items():
            if job not in JOBS or not isinstance(entry, dict):
                raise CollateError(f"{where}.values.{job}: not a job of mflag/jobs.py ({', '.join(JOBS)}) holding "
                                   "pct1 / pct10 / pct100 values")  # fmt: skip
            for pkey, value in entry.items():
                pct = int(pkey[3:]) if isinstance(pkey, str) and pkey[3:].isdigit() else None
                if not str(pkey).startswith("pct") or pct not in PCTS or not _number(value):
                    raise CollateError(f"{where}.values.{job}.{pkey}: keys are pct1, pct10, pct100 and values "
                                       "numbers (percent)")  # fmt: skip
                values[(job, pct)] = float(value)
        if not all(isinstance(row[k], str) and row[k].strip() for k in ("key", "label", "source", "protocol")):
            raise CollateError(f"{where}: key, label, source and protocol must be non-empty text")
        if metric is not None and any(METRIC_LABELS[JOBS[j].metric] == metric.strip() for j, _ in values):
            raise CollateError(f"{where}.metric: {metric} is the job's own metric; leave `metric` out")
        rows.append(RefRow(row["key"], row["label"], row["source"].strip(), row["protocol"].strip(), values,
                           row["kind"], None if metric is None else metric.strip()))  # fmt: skip
    return rows


def _ref_note(r: RefRow) -> str:
    lead = "Independent re-evaluation of M-FLAG. " if r.kind == "independent" else ""
    return f"{lead}{r.label}: {r.source}; {r.protocol}."


def _other_metric_note(r: RefRow, jobs: list[str]) -> str:
    """A reference in another metric, as text: not comparable cell by cell with the table's columns."""
    parts = []
    for job in jobs:
        pcts = [p for p in PCTS if (job, p) in r.values]
        if pcts:
            figures = " / ".join(_pct(r.values[(job, p)]) for p in pcts)
            parts.append(f"{JOBS[job].label} {r.metric} {figures} at {' / '.join(f'{p}' for p in pcts)}%")
    return (f"In another metric ({r.metric}), so not a row: {_ref_note(r)} Its figures: {'; '.join(parts)}.")


# --------------------------------------------------------------------------------------- metrics
def collated_metrics(study: Study, pretrain: dict[str, dict[str, float]]) -> dict:
    """The nested metrics whose flattened keys read <job>.<encoder>.pct<p>.<metric> (with _lo, _hi, _sd and
    vs_<other>.<metric>_diff[_lo|_hi]) and <run>.<key> for the pretraining runs."""
    out: dict = {}
    for job, pct, enc in sorted(study.cells, key=lambda k: (k[0], k[2], f"pct{k[1]}")):
        m = JOBS[job].metric
        entry: dict = {m: study.cells[(job, pct, enc)]}
        if (job, pct, enc) in study.intervals:
            entry[f"{m}_lo"], entry[f"{m}_hi"] = study.intervals[(job, pct, enc)]
        if (job, pct, enc) in study.spreads:
            entry[f"{m}_sd"] = study.spreads[(job, pct, enc)][0]
        for other in study.encoders:
            d = study.diffs.get((job, pct, enc, other))
            if d is not None:
                entry[f"vs_{other}"] = {f"{m}_diff": d.diff, f"{m}_diff_lo": d.lo, f"{m}_diff_hi": d.hi}
        out.setdefault(job, {}).setdefault(enc, {})[f"pct{pct}"] = entry
    for run, values in pretrain.items():
        out[run] = {k: values[k] for k in sorted(values)}
    return {k: out[k] for k in sorted(out)}


# ---------------------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class Row:
    key: str  # encoder name, or a reference row's key
    label: str
    values: list[float | None]  # percent
    best: list[bool]
    lo: list[float | None] = field(default_factory=list)  # percent; the interval's bounds
    hi: list[float | None] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)  # per column: why the cell is not evaluable, or None

    def shown(self, column: int, dash: str, tex: bool = False) -> str:
        """A value in percent with one decimal and its interval; `n/a` where not evaluable, `dash` where not run."""
        if self.reasons and self.reasons[column] is not None:
            return "n/a"
        text = _pct(self.values[column], dash)
        if self.lo and self.lo[column] is not None and self.hi[column] is not None:
            bounds = f"[{self.lo[column]:.1f}, {self.hi[column]:.1f}]"
            text += rf" {{\scriptsize {bounds}}}" if tex else f" {bounds}"
        return text


@dataclass(frozen=True)
class Table:
    name: str
    jobs: list[str]
    rows: list[Row]
    references: list[Row]
    ref_notes: list[str]
    missing: list[str]
    level: float = 0.95
    seeds: list[int] = field(default_factory=list)  # distinct seed counts of the cells that report a mean
    not_evaluable: list[str] = field(default_factory=list)  # "<cell> (<reason>)" of the cells shown as n/a
    other_notes: list[str] = field(default_factory=list)  # references in another metric than the columns'

    @property
    def columns(self) -> list[tuple[str, int]]:
        return [(j, p) for j in self.jobs for p in PCTS]

    @property
    def headers(self) -> list[str]:
        return [f"{JOBS[j].label} {METRIC_LABELS[JOBS[j].metric]} {p}%" for j, p in self.columns]


def _jobs_of(table: str) -> list[str]:
    return [j for j, spec in JOBS.items() if TASK_TABLES[spec.task] == table]


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _pct(value: float | None, dash: str = "-") -> str:
    return dash if value is None else f"{value:.1f}"


def fraction_table(study: Study, table: str, references: list[RefRow]) -> Table:
    jobs = _jobs_of(table)
    columns = [(j, p) for j in jobs for p in PCTS]
    rows = []
    values = {e: [_percent(study.cells.get((j, p, e))) for j, p in columns] for e in study.encoders}
    best = [max((v[c] for v in values.values() if v[c] is not None), default=None) for c in range(len(columns))]
    na = []
    for enc, label in study.encoders.items():
        bounds = [study.intervals.get((j, p, enc), (None, None)) for j, p in columns]
        why = [study.reasons.get((j, p, enc)) if study.cells.get((j, p, enc), 0) is None else None for j, p in columns]
        na += [f"{cell_name(j, p, enc)} ({w})" for (j, p), w in zip(columns, why) if w]
        rows.append(Row(enc, label, values[enc], [x is not None and x == b for x, b in zip(values[enc], best)],
                        [_percent(lo) for lo, _ in bounds], [_percent(hi) for _, hi in bounds], why))  # fmt: skip
    refs = [r for r in references if any(k[0] in jobs for k in r.values)]
    ref_rows = [Row(r.key, r.label, [r.values.get(c) for c in columns], [False] * len(columns))
                for r in refs if r.metric is None]  # fmt: skip
    notes = [_ref_note(r) for r in refs if r.metric is None]
    others = [_other_metric_note(r, jobs) for r in refs if r.metric is not None]
    missing = [m for m in study.missing() if m.rsplit("-", 2)[0] in jobs]
    seeds = sorted({n for (j, _, _), (_, n) in study.spreads.items() if j in jobs})
    return Table(table, jobs, rows, ref_rows, notes, missing, study.level, seeds, na, others)


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "|": r"\textbar{}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    return re.sub(r"[\\&%$#_{}|~^]", lambda m: _TEX_ESCAPES[m.group()], text)


def _level(level: float) -> str:
    return f"{100 * level:g}%"


def _table_notes(table: Table, dash: str) -> list[str]:
    notes = [f"Values in percent on the test split, with the {_level(table.level)} bootstrap interval over test cases "
             f"in brackets. Bold: the best encoder per column (highest unrounded value; reference rows are not "
             f"compared); whether a difference is more than chance is in the {table.name}_differences table. "
             f"{dash}: cell not run."]  # fmt: skip
    if table.seeds:
        counts = " or ".join(str(n) for n in table.seeds)
        notes.append(f"Each value is the mean over {counts} seeds of the cell's probe, trained on the same encoder "
                     f"features; their standard deviations are in reports/metrics.json (<metric>_sd).")  # fmt: skip
    if table.missing:
        notes.append(f"Missing cells ({len(table.missing)}, shown as {dash}): {', '.join(table.missing)}.")
    if table.not_evaluable:
        notes.append(f"Not evaluable ({len(table.not_evaluable)}, shown as n/a: the cell ran, its metric is "
                     f"undefined): {'; '.join(table.not_evaluable)}.")  # fmt: skip
    return notes + table.other_notes


def render_md(table: Table) -> str:
    lines = ["| Encoder | " + " | ".join(table.headers) + " |", "|---|" + "---:|" * len(table.headers)]
    for row in table.rows:
        cells = [f"**{row.shown(c, '-')}**" if b else row.shown(c, "-") for c, b in enumerate(row.best)]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    for k, ref in enumerate(table.references, 1):
        lines.append(f"| {ref.label}[^ref{k}] | " + " | ".join(_pct(v, "") for v in ref.values) + " |")
    notes = [""] + _table_notes(table, "-") + [""] * bool(table.ref_notes)
    notes += [f"[^ref{k}]: {note}" for k, note in enumerate(table.ref_notes, 1)]
    return "\n".join(lines + notes) + "\n"


def render_tex(table: Table) -> str:
    n = len(table.headers)
    groups = " & ".join(
        rf"\multicolumn{{3}}{{c}}{{{_tex(JOBS[j].label)} ({METRIC_LABELS[JOBS[j].metric]})}}" for j in table.jobs
    )
    rules = "".join(rf"\cmidrule(lr){{{2 + 3 * k}-{4 + 3 * k}}}" for k in range(len(table.jobs)))
    lines = [
        "% Written by stages/collate.py (booktabs); values in percent.",
        rf"\begin{{tabular}}{{l*{{{n}}}{{c}}}}",
        r"\toprule",
        rf" & {groups} \\",
        rules,
        "Encoder & " + " & ".join(rf"{p}\%" for _, p in table.columns) + r" \\",
        r"\midrule",
    ]
    for row in table.rows:
        cells = [row.shown(c, "--", tex=True) for c in range(n)]
        cells = [rf"\textbf{{{c}}}" if b else c for c, b in zip(cells, row.best)]
        lines.append(f"{_tex(row.label)} & " + " & ".join(cells) + r" \\")
    if table.references:
        lines.append(r"\midrule")
    for k, ref in enumerate(table.references, 1):
        lines.append(f"{_tex(ref.label)}$^{{{k}}}$ & " + " & ".join(_pct(v, "") for v in ref.values) + r" \\")
    refs = " ".join(rf"$^{{{k}}}${_tex(note)}" for k, note in enumerate(table.ref_notes, 1))
    lines += [r"\bottomrule", r"\end{tabular}", "",
              r"\smallskip{\footnotesize " + " ".join(_tex(s) for s in _table_notes(table, "--"))
              + (f" {refs}" if refs else "") + "}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def _csv_text(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def render_csv(table: Table) -> str:
    """One row per encoder and reference row; per column the value, then `<header> lo` and `<header> hi`."""
    headers = table.headers
    rows = []
    for row in [*table.rows, *table.references]:
        best = ";".join(h for h, b in zip(headers, row.best) if b)
        na = ";".join(f"{h}: {r}" for h, r in zip(headers, row.reasons or [None] * len(headers)) if r is not None)
        values = []
        for c in range(len(headers)):
            values += [_pct(row.values[c], ""), *(_pct(b[c], "") if b else "" for b in (row.lo, row.hi))]
        rows.append([row.key, row.label, *values, best, na])
    header = [x for h in headers for x in (h, f"{h} lo", f"{h} hi")]
    return _csv_text(["encoder", "label", *header, "best", "not_evaluable"], rows)


def _diff_text(d: Diff | None, dash: str) -> str:
    if d is None:
        return dash
    text = f"{100 * d.diff:+.1f}"
    if d.lo is not None and d.hi is not None:
        text += f" [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}]"
    return text + ("*" if d.excludes_zero else "")


def _pairs(study: Study) -> list[tuple[str, str]]:
    """Every pair of encoders once, in params order (the first listed minus the later one)."""
    return list(itertools.combinations(study.encoders, 2))


def render_differences(study: Study, table: str) -> dict[str, str]:
    """The paired differences of every pair of encoders, per column, as {"md": ..., "csv": ...}."""
    jobs = _jobs_of(table)
    columns = [(j, p) for j in jobs for p in PCTS]
    headers = [f"{JOBS[j].label} {METRIC_LABELS[JOBS[j].metric]} {p}%" for j, p in columns]
    md = ["| Difference | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers)]
    rows = []
    for a, b in _pairs(study):
        diffs = [study.diffs.get((j, p, a, b)) for j, p in columns]
        md.append(f"| {study.encoders[a]} - {study.encoders[b]} | " + " | ".join(_diff_text(d, "-") for d in diffs)
                  + " |")  # fmt: skip
        cells = []
        for d in diffs:
            cells += [_repr(None if d is None else 100 * d.diff), *(_repr(None if d is None or x is None else 100 * x)
                                                                    for x in (d and d.lo, d and d.hi))]  # fmt: skip
            cells.append("" if d is None else int(d.excludes_zero))
        rows.append([a, b, *cells])
    md += ["", f"Percentage points, first encoder minus second, on the same test cases; in brackets the paired "
               f"{_level(study.level)} bootstrap interval (the same resamples of the test cases for both). *: the "
               f"interval excludes 0. -: a cell not run or not evaluable."]  # fmt: skip
    header = [x for h in headers for x in (f"{h} diff", f"{h} lo", f"{h} hi", f"{h} excludes_0")]
    return {"md": "\n".join(md) + "\n", "csv": _csv_text(["encoder", "minus", *header], rows)}


# (group, label, key, kind); kind: pct (a fraction shown in percent), count, or float
PRETRAIN_ROWS = (
    ("loss", "total", "loss_total", "float"),
    ("loss", "alignment (M-FLAG)", "loss_align", "float"),
    ("loss", "orthogonality (M-FLAG)", "loss_ortho", "float"),
    ("loss", "InfoNCE (ConVIRT-style)", "loss_infonce", "float"),
    ("retrieval", "image-to-text R@1", "i2t_r1", "pct"),
    ("retrieval", "image-to-text R@5", "i2t_r5", "pct"),
    ("retrieval", "image-to-text R@10", "i2t_r10", "pct"),
    ("retrieval", "text-to-image R@1", "t2i_r1", "pct"),
    ("retrieval", "text-to-image R@5", "t2i_r5", "pct"),
    ("retrieval", "text-to-image R@10", "t2i_r10", "pct"),
    ("geometry", "effective rank", "effective_rank", "float"),
    ("geometry", "mean absolute off-diagonal correlation", "mean_abs_offdiag_corr", "float"),
    ("parameters", "total", "params_total", "count"),
    ("parameters", "trainable", "params_trainable", "count"),
    ("parameters", "frozen", "params_frozen", "count"),
)
RUN_LABELS = {"pretrain": "M-FLAG", "pretrain_convirt": "ConVIRT-style"}


def _pretrain_value(kind: str, value: float | None, thousands: bool) -> str:
    if value is None:
        return "-" if thousands else ""
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "count":
        return f"{int(value):,}" if thousands else str(int(value))
    return f"{value:.4f}"


def render_pretraining(runs: dict[str, dict[str, float]]) -> dict[str, str]:
    """The pretraining table of both runs (columns) as {"md": ..., "tex": ..., "csv": ...}."""
    names = list(runs)
    labels = [RUN_LABELS.get(r, r) for r in names]
    n_valid = runs[names[0]].get("valid_images")
    note = f"Retrieval and geometry on the mimic valid split ({int(n_valid)} images); percentages in %." if n_valid else ""
    md = ["| group | quantity | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(names)]
    tex = ["% Written by stages/collate.py (booktabs).", rf"\begin{{tabular}}{{ll{'r' * len(names)}}}", r"\toprule",
           "group & quantity & " + " & ".join(_tex(x) for x in labels) + r" \\", r"\midrule"]  # fmt: skip
    body = []
    for g, label, key, kind in PRETRAIN_ROWS:
        shown = [_pretrain_value(kind, runs[r].get(key), True) for r in names]
        md.append(f"| {g} | {label} | " + " | ".join(shown) + " |")
        tex.append(f"{g} & {_tex(label)} & " + " & ".join(_tex(s) for s in shown) + r" \\")
        body.append([g, label, key, *[_pretrain_value(kind, runs[r].get(key), False) for r in names]])
    tex += [r"\bottomrule", r"\end{tabular}"] + ([rf"\smallskip{{\footnotesize {_tex(note)}}}"] if note else [])
    return {
        "md": "\n".join(md + ([""] + [note] if note else [])) + "\n",
        "tex": "\n".join(tex) + "\n",
        "csv": _csv_text(["group", "quantity", "key", *names], body),
    }


# ----------------------------------------------------------------------------------------- plots
def _repr(value: float | None) -> str:
    return "" if value is None else repr(rounded(value))


def fraction_csv(study: Study, job: str) -> str:
    """Metric (fraction) vs data fraction for one job, long format: pct, encoder, value, lo, hi (empty where
    not run, not evaluable or without an interval)."""
    rows = []
    for enc in study.encoders:
        for p in PCTS:
            lo, hi = study.intervals.get((job, p, enc), (None, None))
            rows.append([p, enc, _repr(study.cells.get((job, p, enc))), _repr(lo), _repr(hi)])
    return _csv_text(["pct", "encoder", "value", "lo", "hi"], rows)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})  # no version tag: same bytes every run
    return buf.getvalue()


def _figure(rows: int, cols: int, size: tuple[float, float]):
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def fraction_png(study: Study, references: list[RefRow]) -> bytes:
    import matplotlib.style

    with matplotlib.style.context("default"):  # not the user's matplotlibrc: same bytes everywhere
        fig, axes = _figure(len(TABLES), 3, (12, 10))
        shift = {e: 1.06 ** (k - (len(study.encoders) - 1) / 2) for k, e in enumerate(study.encoders)}
        for r, table in enumerate(TABLES):
            jobs = _jobs_of(table)
            for c, ax in enumerate(axes[r]):
                if c >= len(jobs):
                    ax.set_axis_off()
                    continue
                job = jobs[c]
                for enc, label in study.encoders.items():
                    y = [math.nan if study.cells.get((job, p, enc)) is None else 100 * study.cells[(job, p, enc)]
                         for p in PCTS]  # fmt: skip
                    bounds = [study.intervals.get((job, p, enc), (None, None)) for p in PCTS]
                    err = [[0.0 if lo is None or math.isnan(v) else v - 100 * lo for v, (lo, _) in zip(y, bounds)],
                           [0.0 if hi is None or math.isnan(v) else 100 * hi - v for v, (_, hi) in zip(y, bounds)]]
                    # the encoders side by side around each fraction, so their intervals do not hide each other
                    ax.errorbar([p * shift[enc] for p in PCTS], y, yerr=err, marker="o", capsize=3, label=label)
                for k, ref in enumerate(r for r in references if r.metric is None):  # another metric: no point
                    pts = [(p, ref.values[(job, p)]) for p in PCTS if (job, p) in ref.values]
                    if pts:
                        ax.plot(*zip(*pts), marker="*", ms=11, ls=":", color=str(0.2 + 0.2 * k), label=ref.label)
                ax.set_xscale("log")
                ax.set_xticks(PCTS, [f"{p}%" for p in PCTS])
                ax.set_title(f"{JOBS[job].label} {METRIC_LABELS[JOBS[job].metric]} ({job})")
                ax.set_xlabel("training data")
                ax.set_ylabel(f"{METRIC_LABELS[JOBS[job].metric]} (%)")
                ax.grid(alpha=0.3)
        seen: dict = {}
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(lab, h)
        fig.legend(list(seen.values()), list(seen), loc="lower right", bbox_to_anchor=(0.97, 0.08), fontsize=8)
        fig.suptitle(f"Test metric vs training data; bars: {_level(study.level)} bootstrap intervals over test cases")
        return _png(fig)


def losses_png(losses: dict[str, dict[str, list[float]]]) -> bytes:
    """The loss terms of each pretraining run, one panel per term."""
    import matplotlib.style

    panels = [(run, key) for run, cols in losses.items() for key in cols if key not in ("step", "epoch", "lr")]
    with matplotlib.style.context("default"):
        fig, axes = _figure(len(panels), 1, (7, 2.2 * len(panels)))
        for ax, (run, key) in zip(axes[:, 0], panels):
            ax.plot(losses[run]["step"], losses[run][key])
            ax.set_ylabel(f"{key} loss")
            ax.set_title(RUN_LABELS.get(run, run), fontsize=9)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        return _png(fig)


def spectrum_png(spectra: dict[str, dict[str, list[float]]]) -> bytes:
    import matplotlib.style

    with matplotlib.style.context("default"):
        fig, axes = _figure(1, 1, (7, 4.5))
        ax = axes[0, 0]
        for run, spectrum in spectra.items():
            ax.plot(spectrum["index"], spectrum["singular_value"], label=RUN_LABELS.get(run, run))
        ax.set_yscale("log")
        ax.set(xlabel="index", ylabel="singular value", title="Spectrum of the image features (mimic valid)")
        ax.legend()
        ax.grid(alpha=0.3)
        return _png(fig)


# ---------------------------------------------------------------------------------------- claims
def _claim(title: str, verdict: str, body: list[str]) -> str:
    return "\n".join([f"## {title}: **{verdict}**", "", *body, ""])


def paper_parameter_counts(paper, lm: dict) -> dict[str, int]:
    """Trainable parameters in the paper configuration (`paper`: configs/paper.yaml, parsed), counted from the
    modules themselves: torchvision's ResNet-50 trunk, this project's projectors, and transformers' BERT layer of
    the paper's language model (`lm`: its hidden size, heads, FFN width and total size, references file)."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    from mflag.models import Projector, count_parameters, resnet50_trunk

    m = paper.model
    layer = count_parameters(BertLayer(BertConfig(hidden_size=lm["hidden_size"], num_attention_heads=lm["heads"],
                                                  intermediate_size=lm["intermediate_size"])))  # fmt: skip
    vision = count_parameters(resnet50_trunk()) + count_parameters(Projector(2048, m.proj_hidden, m.proj_dim))
    base = vision + count_parameters(Projector(lm["hidden_size"], m.proj_hidden, m.proj_dim))
    return {"mflag": base + paper.mflag.text_free_layers * layer, "convirt": base + paper.convirt.text_free_layers * layer,
            "full_lm": base + int(lm["parameters"]), "layer": layer, "convirt_layers": paper.convirt.text_free_layers,
            "lm_layers": lm["layers"]}  # fmt: skip


def claim_parameters(runs: dict[str, dict[str, float]], paper: dict[str, int] | None, lm: dict) -> str:
    title = "(a) 78% fewer trainable parameters than the methods compared"
    ours, theirs = (runs.get(r, {}).get("params_trainable") for r in ("pretrain", "pretrain_convirt"))
    if ours is None or theirs is None:
        return _claim(title, "not evaluable", ["A pretraining run's metrics.json has no `params_trainable`."])
    run_cut = 1 - ours / theirs
    body = [f"This run: M-FLAG trains {int(ours):,} parameters, the ConVIRT-style baseline {int(theirs):,} "
            f"({100 * run_cut:.1f}% fewer for M-FLAG). The gap is the baseline's trained language-model layers; "
            "its size follows from the language model, not from the method."]  # fmt: skip
    verdict = "not evaluable"
    if paper is not None:
        vs_full, vs_convirt = 1 - paper["mflag"] / paper["full_lm"], 1 - paper["mflag"] / paper["convirt"]
        verdict = "supported" if abs(vs_full - PAPER_REDUCTION) <= REDUCTION_TOLERANCE and run_cut > 0 else "not supported"
        body += ["", f"The paper configuration (`configs/paper.yaml`, {lm['name']}: {lm['layers']} layers of "
                 f"{paper['layer']:,} parameters, about {lm['parameters'] / 1e6:.0f}M in all; counted from the modules): "
                 f"M-FLAG trains {paper['mflag']:,}; a method that trains its whole language model "
                 f"{paper['full_lm']:,} ({100 * vs_full:.1f}% fewer for M-FLAG; paper: {100 * PAPER_REDUCTION:.0f}%, "
                 f"counted as supported within {100 * REDUCTION_TOLERANCE:.0f} points); the ConVIRT-style baseline "
                 f"with its top {paper['convirt_layers']} of {paper['lm_layers']} layers trained "
                 f"{paper['convirt']:,} ({100 * vs_convirt:.1f}% fewer). The paper's figure matches a comparison "
                 "with methods that train their whole language model."]  # fmt: skip
    return _claim(title, verdict, body)


def _cell_value(study: Study, key: Key) -> str:
    v, bounds = study.cells.get(key), study.intervals.get(key)
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}" + (f" [{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]" if bounds and bounds[0] is not None
                               else "")  # fmt: skip


def claim_mflag_ahead(study: Study) -> str:
    title = "(b) M-FLAG ahead of every other encoder, on every job and data fraction"
    others = [e for e in study.encoders if e != "mflag"]
    if "mflag" not in study.encoders or not others:
        return _claim(title, "not evaluable", ["The study lists no M-FLAG encoder and another to compare it with."])
    ahead, behind, unclear, tied, undefined = [], [], [], [], []
    for other in others:
        for job in JOBS:
            for pct in PCTS:
                a, b = (job, pct, "mflag"), (job, pct, other)
                if a not in study.cells or b not in study.cells:
                    continue
                d = study.diffs.get((job, pct, "mflag", other))
                if d is None:
                    undefined.append(f"- {job} at {pct}% vs {study.encoders[other]}: a metric not evaluable")
                    continue
                line = (f"- {job} at {pct}% vs {study.encoders[other]}: {_diff_text(d, '-')} points "
                        f"(M-FLAG {_cell_value(study, a)}, {study.encoders[other]} {_cell_value(study, b)})")
                if d.excludes_zero:
                    (ahead if d.diff > 0 else behind).append(line)
                else:  # equal on every resample (both at 0, say) is no evidence either way, and said so
                    (tied if d.diff == 0 and d.lo == d.hi == 0 else unclear).append(line)
    compared = len(ahead) + len(behind) + len(unclear) + len(tied)
    if compared == 0:
        return _claim(title, "not evaluable", ["No (job, fraction) has M-FLAG and another encoder both evaluated."])
    verdict = "supported" if len(ahead) == compared and not undefined else "not supported"
    body = [f"Of {compared} comparisons (job x fraction x other encoder), M-FLAG is ahead in {len(ahead)}, behind in "
            f"{len(behind)}, within chance in {len(unclear)}, and equal on every resample in {len(tied)}: ahead or "
            f"behind only where the paired {_level(study.level)} bootstrap interval of the difference (same test "
            "resamples) excludes 0."]  # fmt: skip
    for name, lines in (("Ahead", ahead), ("Behind", behind), ("Within chance", unclear),
                        ("Equal on every resample", tied), ("Not evaluable", undefined)):
        if lines:
            body += ["", f"{name}:", *lines]
    return _claim(title, verdict, body)


def claim_one_percent_rsna(study: Study) -> str:
    title = "(c) 1% RSNA segmentation from M-FLAG beats ImageNet init at 100%"
    ours, theirs = ("seg_rsna", 1, "mflag"), ("seg_rsna", 100, "imagenet")
    if "imagenet" not in study.encoders:
        return _claim(title, "not evaluable", [
            "No `imagenet` encoder is listed under `encoders` in params.yaml: the ImageNet-initialised baseline needs "
            "torchvision's ResNet-50 ImageNet weights, which are not shipped (no download happens here). Add the entry "
            "shown in params.yaml (configs/paper.yaml lists it) and put the file in place."
            + (f" M-FLAG at 1%: Dice {_cell_value(study, ours)}." if study.cells.get(ours) is not None else "")])  # fmt: skip
    missing = [cell_name(*k) for k in (ours, theirs) if k not in study.cells]
    if missing:
        return _claim(title, "not evaluable", [f"Cells not run: {', '.join(missing)}."])
    d = study.paired(*ours, *theirs)
    if d is None:
        na = "; ".join(f"{cell_name(*k)}: {study.reasons.get(k)}" for k in (ours, theirs) if study.cells[k] is None)
        return _claim(title, "not evaluable", [f"Not evaluable (the cell ran, its metric is undefined): {na}."])
    verdict = "supported" if d.excludes_zero and d.diff > 0 else "not supported"
    return _claim(title, verdict, [
        f"Dice: M-FLAG at 1% {_cell_value(study, ours)} vs ImageNet at 100% {_cell_value(study, theirs)}; difference "
        f"{_diff_text(d, '-')} points (paired {_level(study.level)} bootstrap interval over the same test images; "
        "supported only where it excludes 0 on the positive side)."])  # fmt: skip


def claim_efficiency(runs: dict[str, dict[str, float]], timings: dict[str, dict]) -> str:
    title = "(d) Efficiency: M-FLAG pretrains faster and trains fewer parameters than the baseline"
    speed = {r: (timings.get(r) or {}).get("images_per_second") for r in ("pretrain", "pretrain_convirt")}
    params = {r: runs.get(r, {}).get("params_trainable") for r in ("pretrain", "pretrain_convirt")}
    if not all(_number(v) for v in (*speed.values(), *params.values())):
        return _claim(title, "not evaluable", ["reports/pretrain*/timing.json or metrics.json lack "
                                               "`images_per_second` or `params_trainable`."])  # fmt: skip
    ours, theirs = speed["pretrain"], speed["pretrain_convirt"]
    where = {r: f"{t.get('device', '?')}, {t.get('precision', '?')}" for r, t in timings.items()}
    verdict = "supported" if ours > theirs and params["pretrain"] < params["pretrain_convirt"] else "not supported"
    return _claim(title, verdict, [
        f"Pretraining throughput in this DAG run: M-FLAG {ours:.1f} images/s ({where['pretrain']}), ConVIRT-style "
        f"{theirs:.1f} images/s ({where['pretrain_convirt']}), a ratio of {ours / theirs:.2f}; the baseline also "
        f"spent {timings['pretrain_convirt'].get('text_precompute_seconds', 0):.0f} s once on its frozen lower "
        "language-model layers, not counted above. Trainable parameters: M-FLAG "
        f"{int(params['pretrain']):,}, ConVIRT-style {int(params['pretrain_convirt']):,}.",
        "",
        "Throughput is a timing: it varies between runs and machines (the only figures here that do).",
    ])  # fmt: skip


def render_claims(study: Study, runs: dict[str, dict[str, float]], timings: dict[str, dict],
                  paper: dict[str, int] | None, lm: dict) -> str:  # fmt: skip
    head = ["# The M-FLAG paper's headline claims, checked against this run", "",
            "Written by stages/collate.py from reports/pretrain*/ and reports/finetune/*/. Verdicts: supported, not "
            "supported, or not evaluable (the run lacks what the claim needs, or a cell it needs has an undefined "
            f"metric). Intervals: {_level(study.level)} bootstrap over the test cases, the same resamples for every "
            "encoder (docs/design.md, \"Intervals\").",
            ""]  # fmt: skip
    return "\n".join(head + [claim_parameters(runs, paper, lm), claim_mflag_ahead(study),
                             claim_one_percent_rsna(study), claim_efficiency(runs, timings)])  # fmt: skip


# ----------------------------------------------------------------------------------------- write
def write_reports(study: Study, runs: dict[str, dict[str, float]], losses: dict, spectra: dict,
                  references: list[RefRow], timings: dict[str, dict], paper: dict[str, int] | None, lm: dict,
                  out: str | Path) -> None:  # fmt: skip
    """Everything collate writes, under `out` (metrics.json, tables/, plots/, claims.md)."""
    out = Path(out)
    write_json(out / "metrics.json", collated_metrics(study, runs))  # strict JSON, floats rounded
    floor = trivial_row(study)
    references = ([floor] if floor else []) + list(references)
    for name in TABLES:
        table = fraction_table(study, name, references)
        atomic_write(out / "tables" / f"{name}.md", render_md(table))
        atomic_write(out / "tables" / f"{name}.tex", render_tex(table))
        atomic_write(out / "tables" / f"{name}.csv", render_csv(table))
        for ext, text in render_differences(study, name).items():
            atomic_write(out / "tables" / f"{name}_differences.{ext}", text)
    for ext, text in render_pretraining(runs).items():
        atomic_write(out / "tables" / f"pretraining.{ext}", text)
    for job in JOBS:
        atomic_write(out / "plots" / "fraction" / f"{job}.csv", fraction_csv(study, job))
    atomic_write(out / "plots" / "fraction.png", fraction_png(study, references))
    atomic_write(out / "plots" / "losses.png", losses_png(losses))
    atomic_write(out / "plots" / "spectrum.png", spectrum_png(spectra))
    atomic_write(out / "claims.md", render_claims(study, runs, timings, paper, lm))
