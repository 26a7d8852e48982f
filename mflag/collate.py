"""Collation: every fine-tuning cell and the pretraining run into paper-style tables, plots and claims.

Inputs are the cells' ``metrics.json`` (one per job x fraction x init), the pretraining metrics and
CSVs, and the published figures (``references/paper_reference.yaml``, percent). Everything written
is small, deterministic (sorted, no time stamps, PNGs without a software tag) and meant for Git:

* ``metrics.json``: ``{job: {init: {pct<p>: {metric: value}}}, "pretrain": {key: value}}``, values
  as the cells wrote them (fractions, not percent, rounded by ``mflag.io.rounded``); only each job's own
  metric is kept. A cell whose metric is not evaluable (null, with its ``not_evaluable`` reason) keeps null.
* ``tables/{classification,segmentation,detection}.{md,tex,csv}``: one row per encoder init, columns
  dataset x 1 % / 10 % / 100 %, values in percent with one decimal, then a ``published`` row holding
  the paper's figure in the 100 % columns. The best init per column is the highest unrounded value
  (exact ties all marked; the published row is not compared): **bold** in md and tex; in csv a last
  column ``best`` lists, ``;``-separated, the column headers in which that row is best. A cell not run
  is a dash in md and tex and an empty field in csv (the published row's 1 % / 10 % fields are empty
  too: nothing was published for them). A cell that ran but whose metric is not evaluable is ``n/a`` in md
  and tex and an empty field in csv, whose last column ``not_evaluable`` lists, ``;``-separated,
  ``<header>: <reason>`` for that row; md and tex give the reasons in a note.
* ``tables/pretraining.{md,tex,csv}``: final losses, retrieval, feature geometry, parameter counts.
* ``plots/fraction/<job>.csv`` (``pct,mflag,random[,imagenet]``, fractions; an empty field where a cell
  is missing or not evaluable), ``plots/fraction.png``, ``plots/losses.png``, ``plots/spectrum.png``.
* ``claims.md``: the paper's headline claims, each supported, not supported or not evaluable (a cell
  whose metric is not evaluable counts as not evaluable there, with its reason).

Every cell file must be strict JSON: a ``NaN`` or ``Infinity`` token is an error naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mflag.io import atomic_write, rounded, write_json
from mflag.jobs import JOBS, PCTS, TASK_TABLES, cell_name


class CollateError(ValueError):
    """An input that breaks its contract (names the file)."""


TABLES = tuple(TASK_TABLES.values())
INIT_LABELS = {"mflag": "M-FLAG", "random": "Random", "imagenet": "ImageNet"}
METRIC_LABELS = {"auc": "AUC", "acc": "ACC", "dice": "Dice", "map": "mAP"}
PUBLISHED_LABEL = "published (M-FLAG paper, fraction not stated; assumed 100%)"
PAPER_REDUCTION = 0.78  # "78% fewer trainable parameters" (abstract)
REDUCTION_TOLERANCE = 0.02  # fraction points: rounding, and the LM's own size differing slightly

Cells = dict[tuple[str, int, str], float | None]  # (job, pct, init) -> the job's metric, a fraction; None: n/a
Reasons = dict[tuple[str, int, str], str]  # (job, pct, init) -> why its metric is not evaluable
Spreads = dict[tuple[str, int, str], tuple[float, int]]  # (job, pct, init) -> (SD over seeds, number of seeds)


@dataclass(frozen=True)
class Reference:
    source: str
    fraction_note: str
    published: dict[str, float]  # job -> the paper's figure, percent


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


def _cell_records(finetune_dir: str | Path):
    """(job, pct, init, path, record) of every cell present under `finetune_dir` (<job>-<pct>-<init>/metrics.json),
    each checked to be JSON whose job, pct and init match its folder."""
    for job in JOBS:
        for pct in PCTS:
            for init in INIT_LABELS:
                path = Path(finetune_dir) / cell_name(job, pct, init) / "metrics.json"
                if not path.is_file():
                    continue
                rec = _load_json(path)
                for key, want in (("job", job), ("pct", pct), ("init", init)):
                    if rec.get(key) != want:
                        raise CollateError(f"{path}: `{key}` is {rec.get(key)!r}, the folder name says {want!r}")
                yield job, pct, init, path, rec


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


def read_cells(finetune_dir: str | Path) -> Cells:
    """The metric of every cell present under `finetune_dir` (<job>-<pct>-<init>/metrics.json), rounded
    (mflag.io.rounded); None where the cell wrote it as null, not evaluable (see :func:`read_not_evaluable`)."""
    cells: Cells = {}
    for job, pct, init, path, rec in _cell_records(finetune_dir):
        metric = JOBS[job].metric
        cells[(job, pct, init)] = None if _reason(path, rec, metric) is not None else rounded(float(rec[metric]))
    return cells


def read_not_evaluable(finetune_dir: str | Path) -> Reasons:
    """Why each cell whose metric is null is not evaluable (its `not_evaluable`)."""
    reasons: Reasons = {}
    for job, pct, init, path, rec in _cell_records(finetune_dir):
        reason = _reason(path, rec, JOBS[job].metric)
        if reason is not None:
            reasons[(job, pct, init)] = reason
    return reasons


def read_spreads(finetune_dir: str | Path) -> Spreads:
    """Cells that report a mean over several seeds (``seeds`` and ``<metric>_sd``): their SD and seed count."""
    spreads: Spreads = {}
    for job, pct, init, path, rec in _cell_records(finetune_dir):
        metric = JOBS[job].metric
        sd, seeds = rec.get(f"{metric}_sd"), rec.get("seeds")
        if rec.get(metric) is None or (sd is None and seeds is None):
            continue  # a metric not evaluable (its SD is null too), or a single run
        if not _number(sd) or not isinstance(seeds, list) or len(seeds) < 2:
            raise CollateError(f"{path}: `{metric}_sd` must be a finite number and `seeds` a list of two or more, "
                               f"got {sd!r} and {seeds!r}")  # fmt: skip
        spreads[(job, pct, init)] = (rounded(float(sd)), len(seeds))
    return spreads


def read_pretrain(path: str | Path) -> dict[str, float]:
    """The scalar entries of the pretraining metrics, rounded (non-numeric ones, null included, are left out)."""
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


def read_reference(path: str | Path) -> Reference:
    """paper_reference.yaml: source, fraction_note and mflag_published {job: {metric: percent}}."""
    raw = yaml.safe_load(Path(path).read_text())
    published = {}
    for job, entry in (raw.get("mflag_published") or {}).items():
        metric = JOBS[job].metric if job in JOBS else None
        if metric is None or not isinstance(entry, dict) or set(entry) != {metric} or not _number(entry[metric]):
            raise CollateError(f"{path}: mflag_published.{job} must be a job ({', '.join(JOBS)}) holding its metric "
                               "as a number")
        published[job] = float(entry[metric])
    return Reference(source=str(raw["source"]), fraction_note=str(raw["fraction_note"]), published=published)


# --------------------------------------------------------------------------------------- metrics
def present_inits(cells: Cells) -> list[str]:
    """mflag and random always; imagenet where any of its cells exists."""
    return [i for i in INIT_LABELS if i != "imagenet" or any(k[2] == i for k in cells)]


def missing_cells(cells: Cells) -> list[str]:
    return [cell_name(j, p, i) for i in present_inits(cells) for j in JOBS for p in PCTS if (j, p, i) not in cells]


def collated_metrics(cells: Cells, pretrain: dict[str, float], spreads: Spreads | None = None) -> dict:
    """The nested metrics whose flattened keys read <job>.<init>.pct<p>.<metric> (plus <metric>_sd where a
    cell reports a mean over seeds) and pretrain.<key>; a metric not evaluable is None (null)."""
    out: dict = {}
    for job, pct, init in sorted(cells, key=lambda k: (k[0], k[2], f"pct{k[1]}")):
        metric = JOBS[job].metric
        entry = {metric: cells[(job, pct, init)]}
        if spreads and (job, pct, init) in spreads:
            entry[f"{metric}_sd"] = spreads[(job, pct, init)][0]
        out.setdefault(job, {}).setdefault(init, {})[f"pct{pct}"] = entry
    out["pretrain"] = {k: pretrain[k] for k in sorted(pretrain)}
    return {k: out[k] for k in sorted(out)}


# ---------------------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class Row:
    key: str  # init key, or "published"
    label: str
    values: list[float | None]  # percent
    best: list[bool]
    reasons: list[str | None] = field(default_factory=list)  # per column: why the cell is not evaluable, or None

    def shown(self, column: int, dash: str) -> str:
        """A value in percent with one decimal; `n/a` where not evaluable, `dash` where not run."""
        if self.reasons and self.reasons[column] is not None:
            return "n/a"
        return _pct(self.values[column], dash)


@dataclass(frozen=True)
class Table:
    jobs: list[str]
    rows: list[Row]
    published: Row
    missing: list[str]
    seeds: list[int] = field(default_factory=list)  # distinct seed counts of the cells that report a mean
    not_evaluable: list[str] = field(default_factory=list)  # "<cell> (<reason>)" of the cells shown as n/a

    @property
    def columns(self) -> list[tuple[str, int]]:
        return [(j, p) for j in self.jobs for p in PCTS]

    @property
    def headers(self) -> list[str]:
        return [f"{JOBS[j].label} {METRIC_LABELS[JOBS[j].metric]} {p}%" for j, p in self.columns]


def _not_evaluable(cells: Cells, reasons: Reasons | None, key: tuple[str, int, str]) -> str | None:
    """Why a cell that ran is not evaluable (its metric is None), or None for a number or a cell not run."""
    if key in cells and cells[key] is None:
        return (reasons or {}).get(key) or "reason not given"
    return None


def fraction_table(cells: Cells, table: str, reference: Reference, spreads: Spreads | None = None,
                   reasons: Reasons | None = None) -> Table:  # fmt: skip
    jobs = [j for j, spec in JOBS.items() if TASK_TABLES[spec.task] == table]
    columns = [(j, p) for j in jobs for p in PCTS]
    inits = present_inits(cells)
    values = {i: [_percent(cells.get((j, p, i))) for j, p in columns] for i in inits}
    why = {i: [_not_evaluable(cells, reasons, (j, p, i)) for j, p in columns] for i in inits}
    best = [max((v[c] for v in values.values() if v[c] is not None), default=None) for c in range(len(columns))]
    rows = [Row(i, INIT_LABELS[i], v, [x is not None and x == b for x, b in zip(v, best)], why[i])
            for i, v in values.items()]  # fmt: skip
    pub = [reference.published.get(j) if p == 100 else None for j, p in columns]
    missing = [m for m in missing_cells(cells) if m.rsplit("-", 2)[0] in jobs]
    seeds = sorted({n for (j, _, _), (_, n) in (spreads or {}).items() if j in jobs})
    na = [f"{cell_name(j, p, i)} ({why[i][c]})" for i in inits for c, (j, p) in enumerate(columns) if why[i][c]]
    return Table(jobs, rows, Row("published", PUBLISHED_LABEL, pub, [False] * len(columns)), missing, seeds, na)


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _pct(value: float | None, dash: str = "-") -> str:
    return dash if value is None else f"{value:.1f}"


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "|": r"\textbar{}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    return re.sub(r"[\\&%$#_{}|~^]", lambda m: _TEX_ESCAPES[m.group()], text)


def _source_note(reference: Reference) -> str:
    return f"Source: {reference.source}; {reference.fraction_note}."


def _table_notes(table: Table, dash: str) -> list[str]:
    notes = [f"Values in percent on the test split. Bold: the best encoder init per column (highest unrounded "
             f"value; the published row is not compared). {dash}: cell not run."]  # fmt: skip
    if table.seeds:
        counts = " or ".join(str(n) for n in table.seeds)
        notes.append(f"Each value is the mean over {counts} seeds of the cell's probe, trained on the same encoder "
                     f"features; their standard deviations are in reports/metrics.json (<metric>_sd).")  # fmt: skip
    if table.missing:
        notes.append(f"Missing cells ({len(table.missing)}, shown as {dash}): {', '.join(table.missing)}.")
    if table.not_evaluable:
        notes.append(f"Not evaluable ({len(table.not_evaluable)}, shown as n/a: the cell ran, its metric is "
                     f"undefined): {'; '.join(table.not_evaluable)}.")  # fmt: skip
    return notes


def render_md(table: Table, reference: Reference) -> str:
    lines = ["| Encoder | " + " | ".join(table.headers) + " |", "|---|" + "---:|" * len(table.headers)]
    for row in table.rows:
        cells = [f"**{row.shown(c, '-')}**" if b else row.shown(c, "-") for c, b in enumerate(row.best)]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    pub = [_pct(v) if p == 100 else "" for v, (_, p) in zip(table.published.values, table.columns)]
    lines.append(f"| {table.published.label}[^published] | " + " | ".join(pub) + " |")
    notes = [""] + _table_notes(table, "-") + ["", f"[^published]: {_source_note(reference)}"]
    return "\n".join(lines + notes) + "\n"


def render_tex(table: Table, reference: Reference) -> str:
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
        cells = [rf"\textbf{{{row.shown(c, '--')}}}" if b else row.shown(c, "--") for c, b in enumerate(row.best)]
        lines.append(f"{_tex(row.label)} & " + " & ".join(cells) + r" \\")
    pub = [_pct(v, "--") if p == 100 else "" for v, (_, p) in zip(table.published.values, table.columns)]
    lines += [r"\midrule", f"{_tex(table.published.label)}$^\\dagger$ & " + " & ".join(pub) + r" \\",
              r"\bottomrule", r"\end{tabular}", "",
              r"\smallskip{\footnotesize " + " ".join(_tex(s) for s in _table_notes(table, "--"))
              + rf" $^\dagger${_tex(_source_note(reference))}}}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def _csv_text(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def render_csv(table: Table) -> str:
    headers = table.headers
    rows = []
    for row in [*table.rows, table.published]:
        best = ";".join(h for h, b in zip(headers, row.best) if b)
        na = ";".join(f"{h}: {r}" for h, r in zip(headers, row.reasons or [None] * len(headers)) if r is not None)
        rows.append([row.key, row.label, *[_pct(v, "") for v in row.values], best, na])
    return _csv_text(["init", "label", *headers, "best", "not_evaluable"], rows)


# (group, label, key, kind); kind: pct (a fraction shown in percent), count, or float
PRETRAIN_ROWS = (
    ("loss", "total", "loss_total", "float"),
    ("loss", "alignment", "loss_align", "float"),
    ("loss", "orthogonality", "loss_ortho", "float"),
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
    ("parameters", "frozen (language model)", "params_frozen", "count"),
    ("parameters", "trainable share", "trainable_share", "pct"),
    ("parameters", "reduction (frozen / total)", "parameter_reduction", "pct"),
)


def _pretrain_value(kind: str, value: float | None, thousands: bool) -> str:
    if value is None:
        return "-" if thousands else ""
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "count":
        return f"{int(value):,}" if thousands else str(int(value))
    return f"{value:.4f}"


def render_pretraining(pretrain: dict[str, float]) -> dict[str, str]:
    """The pretraining table as {"md": ..., "tex": ..., "csv": ...}."""
    rows = [(g, label, key, "%" if kind == "pct" else "", kind) for g, label, key, kind in PRETRAIN_ROWS]
    n_valid = pretrain.get("valid_images")
    note = f"Retrieval and geometry on the mimic valid split ({int(n_valid)} images)." if n_valid else ""
    md = ["| group | quantity | value |", "|---|---|---:|"]
    tex = ["% Written by stages/collate.py (booktabs).", r"\begin{tabular}{llr}", r"\toprule",
           r"group & quantity & value \\", r"\midrule"]  # fmt: skip
    body = []
    for g, label, key, unit, kind in rows:
        shown = _pretrain_value(kind, pretrain.get(key), True) + (f" {unit}" if unit and key in pretrain else "")
        md.append(f"| {g} | {label} | {shown} |")
        tex.append(f"{g} & {_tex(label)} & {_tex(shown)} " + r"\\")
        body.append([g, label, key, _pretrain_value(kind, pretrain.get(key), False), unit])
    tex += [r"\bottomrule", r"\end{tabular}"] + ([rf"\smallskip{{\footnotesize {_tex(note)}}}"] if note else [])
    return {
        "md": "\n".join(md + ([""] + [note] if note else [])) + "\n",
        "tex": "\n".join(tex) + "\n",
        "csv": _csv_text(["group", "quantity", "key", "value", "unit"], body),
    }


# ----------------------------------------------------------------------------------------- plots
def _repr(value: float | None) -> str:
    return "" if value is None else repr(rounded(value))


def fraction_csv(cells: Cells, job: str) -> str:
    """Metric (fraction) vs data fraction for one job, one column per init; empty where not run or not evaluable."""
    inits = present_inits(cells)
    rows = [[p, *[_repr(cells.get((job, p, i))) for i in inits]] for p in PCTS]
    return _csv_text(["pct", *inits], rows)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})  # no version tag: same bytes every run
    return buf.getvalue()


def _figure(rows: int, cols: int, size: tuple[float, float]):
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def fraction_png(cells: Cells, reference: Reference) -> bytes:
    import matplotlib.style

    with matplotlib.style.context("default"):  # not the user's matplotlibrc: same bytes everywhere
        fig, axes = _figure(len(TABLES), 3, (11, 9))
        for r, table in enumerate(TABLES):
            jobs = [j for j, s in JOBS.items() if TASK_TABLES[s.task] == table]
            for c, ax in enumerate(axes[r]):
                if c >= len(jobs):
                    ax.set_axis_off()
                    continue
                job = jobs[c]
                for init in present_inits(cells):
                    y = [math.nan if cells.get((job, p, init)) is None else 100 * cells[(job, p, init)] for p in PCTS]
                    ax.plot(PCTS, y, marker="o", label=INIT_LABELS[init])
                if job in reference.published:
                    ax.plot([100], [reference.published[job]], marker="*", ms=12, ls="", color="0.3",
                            label="published (assumed 100%)")  # fmt: skip
                ax.set_xscale("log")
                ax.set_xticks(PCTS, [f"{p}%" for p in PCTS])
                ax.set_title(f"{JOBS[job].label} {METRIC_LABELS[JOBS[job].metric]} ({job})")
                ax.set_xlabel("training data")
                ax.set_ylabel(f"{METRIC_LABELS[JOBS[job].metric]} (%)")
                ax.grid(alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower right", bbox_to_anchor=(0.95, 0.1))
        return _png(fig)


def losses_png(losses: dict[str, list[float]]) -> bytes:
    import matplotlib.style

    with matplotlib.style.context("default"):
        fig, axes = _figure(3, 1, (7, 8))
        for ax, key in zip(axes[:, 0], ("align", "ortho", "total")):
            ax.plot(losses["step"], losses[key])
            ax.set_ylabel(f"{key} loss")
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        axes[0, 0].set_title("Pretraining losses")
        return _png(fig)


def spectrum_png(spectrum: dict[str, list[float]]) -> bytes:
    import matplotlib.style

    with matplotlib.style.context("default"):
        fig, axes = _figure(1, 1, (7, 4.5))
        ax = axes[0, 0]
        ax.plot(spectrum["index"], spectrum["singular_value"])
        ax.set_yscale("log")
        ax.set(xlabel="index", ylabel="singular value", title="Spectrum of the image features (mimic valid)")
        ax.grid(alpha=0.3)
        return _png(fig)


# ---------------------------------------------------------------------------------------- claims
def _claim(title: str, verdict: str, body: list[str]) -> str:
    return "\n".join([f"## {title}: **{verdict}**", "", *body, ""])


def claim_reduction(pretrain: dict[str, float]) -> str:
    title = "(a) 78% fewer trainable parameters"
    if "parameter_reduction" not in pretrain:
        return _claim(title, "not evaluable", ["reports/pretrain/metrics.json has no `parameter_reduction`."])
    ours = pretrain["parameter_reduction"]
    verdict = "supported" if abs(ours - PAPER_REDUCTION) <= REDUCTION_TOLERANCE else "not supported"
    counts = ", ".join(f"{k.removeprefix('params_')} {int(pretrain[k]):,}" for k in ("params_total", "params_trainable",
                       "params_frozen") if k in pretrain)  # fmt: skip
    return _claim(title, verdict, [
        f"This run: parameter reduction (frozen / total) = {100 * ours:.1f}% ({counts}); paper: "
        f"{100 * PAPER_REDUCTION:.0f}% (counted as supported within {100 * REDUCTION_TOLERANCE:.0f} percentage "
        "points).",
        "",
        "The figure depends on the sizes of the frozen language model and of the projectors, not on the "
        "method: it is the LM's share of all parameters. The paper's configuration (`configs/paper.yaml`: "
        "CXR-BERT, `microsoft/BiomedVLP-CXR-BERT-general`, BERT-base size, about 110M parameters; ResNet-50 "
        "and 1024-d projectors, about 33.5M trainable) gives about 77%, the paper's figure.",
    ])  # fmt: skip


def _na_line(cells: Cells, reasons: Reasons | None, key: tuple[str, int, str]) -> str:
    return f"{cell_name(*key)}: {_not_evaluable(cells, reasons, key)}"


def claim_mflag_ahead(cells: Cells, reasons: Reasons | None = None) -> str:
    title = "(b) M-FLAG ahead of the other encoder inits on every job and data fraction"
    wins, lost, compared, undefined = 0, [], 0, []
    for job in JOBS:
        for pct in PCTS:
            if (job, pct, "mflag") not in cells:
                continue
            ran = [i for i in INIT_LABELS if i != "mflag" and (job, pct, i) in cells]
            if not ran:
                continue
            # a cell whose metric is not evaluable cannot be compared: listed with its reason
            undefined += [f"- {_na_line(cells, reasons, (job, pct, i))}" for i in ["mflag", *ran]
                          if cells[(job, pct, i)] is None]  # fmt: skip
            others = {i: cells[(job, pct, i)] for i in ran if cells[(job, pct, i)] is not None}
            ours = cells[(job, pct, "mflag")]
            if ours is None or not others:
                continue
            compared += 1
            if all(ours > v for v in others.values()):
                wins += 1
            else:
                vs = ", ".join(f"{INIT_LABELS[i]} {100 * v:.1f}" for i, v in others.items())
                lost.append(f"- {job} at {pct}%: M-FLAG {100 * ours:.1f} vs {vs} ({JOBS[job].metric}, %)")
    total = len(JOBS) * len(PCTS)
    tail = ["", "Not evaluable (the cells ran, their metric is undefined):", *undefined] if undefined else []
    if compared == 0:
        return _claim(title, "not evaluable", [f"No (job, fraction) has both an M-FLAG cell and another init's cell "
                                               f"with a defined metric (of {total})."] + tail)  # fmt: skip
    body = [f"M-FLAG is strictly ahead in {wins} of {compared} (job, fraction) cells that have M-FLAG and another "
            f"init" + (f"; {total - compared} of {total} cannot be compared (a cell not run yet"
                       + (", or not evaluable)." if undefined else ").") if compared < total else ".")]
    if lost:
        body += ["", "Not ahead in:", *lost]
    return _claim(title, "supported" if not lost else "not supported", body + tail)


def claim_one_percent_rsna(cells: Cells, reasons: Reasons | None = None) -> str:
    title = "(c) 1% RSNA segmentation from M-FLAG beats ImageNet init at 100%"
    ours_key, theirs_key = ("seg_rsna", 1, "mflag"), ("seg_rsna", 100, "imagenet")
    ours, theirs = cells.get(ours_key), cells.get(theirs_key)
    undefined = [_na_line(cells, reasons, k) for k in (ours_key, theirs_key) if k in cells and cells[k] is None]
    if undefined:
        return _claim(title, "not evaluable", ["Not evaluable (the cell ran, its metric is undefined): "
                                               + "; ".join(undefined) + "."])  # fmt: skip
    if theirs is None:
        return _claim(title, "not evaluable", [
            "No seg_rsna-100-imagenet cell: the ImageNet-initialised baseline needs torchvision's ResNet-50 "
            "ImageNet weights, which are not shipped with this project (no download happens here), so no "
            "imagenet cells were run."
            + (f" M-FLAG at 1%: Dice {100 * ours:.1f}%." if ours is not None else ""),
        ])  # fmt: skip
    if ours is None:
        return _claim(title, "not evaluable", ["No seg_rsna-1-mflag cell."])
    verdict = "supported" if ours > theirs else "not supported"
    return _claim(title, verdict, [f"Dice: M-FLAG at 1% {100 * ours:.1f}% vs ImageNet at 100% {100 * theirs:.1f}%."])


def render_claims(cells: Cells, pretrain: dict[str, float], reasons: Reasons | None = None) -> str:
    head = ["# The M-FLAG paper's headline claims, checked against this run", "",
            "Written by stages/collate.py from reports/pretrain/metrics.json and reports/finetune/*/metrics.json. "
            "Verdicts: supported, not supported, or not evaluable (the run lacks what the claim needs, or a cell "
            "it needs has an undefined metric).",
            ""]  # fmt: skip
    return "\n".join(head + [claim_reduction(pretrain), claim_mflag_ahead(cells, reasons),
                             claim_one_percent_rsna(cells, reasons)])  # fmt: skip


# ----------------------------------------------------------------------------------------- write
def write_reports(
    cells: Cells,
    pretrain: dict[str, float],
    losses: dict[str, list[float]],
    spectrum: dict[str, list[float]],
    reference: Reference,
    out: str | Path,
    spreads: Spreads | None = None,
    reasons: Reasons | None = None,
) -> None:
    """Everything collate writes, under `out` (metrics.json, tables/, plots/, claims.md); `reasons`: why each
    cell whose metric is None is not evaluable (:func:`read_not_evaluable`)."""
    out = Path(out)
    write_json(out / "metrics.json", collated_metrics(cells, pretrain, spreads))  # strict JSON, floats rounded
    for name in TABLES:
        table = fraction_table(cells, name, reference, spreads, reasons)
        atomic_write(out / "tables" / f"{name}.md", render_md(table, reference))
        atomic_write(out / "tables" / f"{name}.tex", render_tex(table, reference))
        atomic_write(out / "tables" / f"{name}.csv", render_csv(table))
    for ext, text in render_pretraining(pretrain).items():
        atomic_write(out / "tables" / f"pretraining.{ext}", text)
    for job in JOBS:
        atomic_write(out / "plots" / "fraction" / f"{job}.csv", fraction_csv(cells, job))
    atomic_write(out / "plots" / "fraction.png", fraction_png(cells, reference))
    atomic_write(out / "plots" / "losses.png", losses_png(losses))
    atomic_write(out / "plots" / "spectrum.png", spectrum_png(spectrum))
    atomic_write(out / "claims.md", render_claims(cells, pretrain, reasons))
