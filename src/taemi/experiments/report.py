"""One self-contained report page over run folders and experiment folders.

Each DIR becomes one section:

- a *run folder* (it holds ``config.yaml``; see README "The run folder"): the config
  (keys that differ from its preset, then the full YAML, collapsible), the validation
  metrics of the best epoch (mean Pearson, Pearson and CCC per emotion, MSE, n, best
  epoch, whether training stopped early), the plots in ``plots/`` and the history table;
- a *cross-validation folder* (``taemi cv``; it holds ``cv.json``): its fold runs listed
  with their headline metrics, the per-fold table with mean, std and pooled rows, the
  config and its figure (:func:`read_cv`);
- a *sweep folder* (``taemi sweep``; it holds ``sweep.json``): the sweep's summary, the
  best config's differences from the base config, the objective, importance and parallel
  coordinates figures and the trials table, best first (:func:`read_sweep`);
- an *experiment folder* (anything else): every ``*.png`` embedded, every ``*.csv`` as a
  table (first :data:`MAX_CSV_ROWS` rows), every ``summary.md`` as preformatted text and
  the run folders below it listed with their headline metrics. A ``baselines.json``
  (``taemi baselines``, or ``taemi ablate --grid baselines``'s ``baselines/``) becomes a
  table of the simple models, with what the best run of the folder gains over the best
  of them (its ``baselines.csv`` is not repeated as a plain table). Files inside those nested
  run folders are not repeated; give a nested run as its own DIR to see it in full.

HTML: one file, inline CSS, figures as ``data:image/png;base64`` URIs, no external
resources, so it reads offline and can be mailed around. All text is escaped.

Markdown: figures are *copied* next to the ``.md`` into ``<stem>_files/`` (for
``report.md``: ``report_files/``) and referenced by relative path, so the file stays
small and diffable and renders on GitHub and in editors; keep the folder with the file
(it is emptied and rewritten on each run).
Table cells and text are escaped (``&``, ``<``, ``>``, ``|``); preformatted text goes in a
fence longer than any backtick run it contains.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taemi.run import CONFIG_FILE, FEATURES_FILE, HISTORY_FILE, METRICS_FILE, PLOTS_DIR

log = logging.getLogger(__name__)

#: Rows of a CSV shown in an experiment section (the rest is counted, not shown).
MAX_CSV_ROWS = 50
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# --------------------------------------------------------------------------- collected data


@dataclass
class Table:
    """A header and rows of strings; ``total`` counts all data rows, shown or not."""

    header: list[str]
    rows: list[list[str]]
    total: int


@dataclass
class Figure:
    path: Path  # the PNG on disk
    caption: str  # path relative to the section's folder


@dataclass
class RunSection:
    """What a run folder holds, read once for both renderers."""

    path: Path
    config_text: str | None  # config.yaml as written
    config_diff: list[tuple[str, Any, Any]]  # (dotted key, preset value, run value)
    preset: str | None
    metrics: dict | None  # metrics.json
    history: Table | None
    figures: list[Figure]
    features_text: str | None  # features.json, pretty-printed


@dataclass
class ExperimentSection:
    path: Path
    figures: list[Figure] = field(default_factory=list)
    tables: list[tuple[str, Table]] = field(default_factory=list)  # (relative path, table)
    summaries: list[tuple[str, str]] = field(default_factory=list)  # (relative path, text)
    # (relative path, metrics.json) of each nested run folder
    runs: list[tuple[str, dict | None]] = field(default_factory=list)
    # (relative path, baselines.json) of each simple-baselines file
    baselines: list[tuple[str, dict]] = field(default_factory=list)


# --------------------------------------------------------------------------- reading


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def read_table(path: Path, max_rows: int | None = None) -> Table:
    """A CSV file as strings; at most ``max_rows`` data rows kept."""
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        rows, total = [], 0
        for row in reader:
            total += 1
            if max_rows is None or len(rows) < max_rows:
                rows.append(row)
    return Table(header, rows, total)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def config_diff(config: dict) -> tuple[str | None, list[tuple[str, Any, Any]]]:
    """The run config's keys that differ from its preset (the ``preset`` field), as
    ``(key, preset value, run value)``; ``(None, [])`` when the preset is unknown."""
    from taemi.config import PRESETS, flat_dict, preset

    name = config.get("preset")
    if name not in PRESETS:
        return None, []
    base = flat_dict(preset(name).to_dict())
    run = flat_dict(config)
    keys = [k for k in run if k != "preset" and run[k] != base.get(k)]
    keys += [k for k in base if k not in run and k != "preset"]
    return name, [(k, base.get(k), run.get(k)) for k in keys]


def read_run(path: Path) -> RunSection:
    import yaml

    config_text = _read_text(path / CONFIG_FILE)
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path / CONFIG_FILE} is not valid YAML: {e}") from None
    preset_name, diff = config_diff(config) if isinstance(config, dict) else (None, [])
    history = read_table(path / HISTORY_FILE) if (path / HISTORY_FILE).is_file() else None
    features = _read_json(path / FEATURES_FILE)
    figures = [
        Figure(p, p.relative_to(path).as_posix()) for p in sorted((path / PLOTS_DIR).glob("*.png"))
    ]
    return RunSection(
        path=path,
        config_text=config_text,
        config_diff=diff,
        preset=preset_name,
        metrics=_read_json(path / METRICS_FILE),
        history=history,
        figures=figures,
        features_text=None if features is None else json.dumps(features, indent=2),
    )


def _nested_runs(path: Path) -> list[Path]:
    """Run folders strictly below ``path``, outermost only, sorted (a cross-validation
    folder holds a config.yaml too, but its runs are its folds)."""
    from taemi.experiments.cv import CV_JSON

    found = sorted(
        p.parent
        for p in path.rglob(CONFIG_FILE)
        if p.parent != path and not (p.parent / CV_JSON).is_file()
    )
    return [r for r in found if not any(o != r and o in r.parents for o in found)]


def read_experiment(path: Path) -> ExperimentSection:
    from taemi.experiments.baselines import RESULTS_CSV, RESULTS_JSON, read_baselines

    sec = ExperimentSection(path)
    runs = _nested_runs(path)
    for f in sorted(path.rglob("*")):
        if not f.is_file() or any(r in f.parents for r in runs):
            continue
        rel = f.relative_to(path).as_posix()
        if f.name == RESULTS_JSON:
            sec.baselines.append((rel, read_baselines(f)))
        elif f.suffix.lower() == ".png":
            sec.figures.append(Figure(f, rel))
        elif f.name == RESULTS_CSV and (f.parent / RESULTS_JSON).is_file():
            continue  # shown as the baselines table
        elif f.suffix.lower() == ".csv":
            sec.tables.append((rel, read_table(f, MAX_CSV_ROWS)))
        elif f.name == "summary.md":
            sec.summaries.append((rel, _read_text(f)))
    sec.runs = [(r.relative_to(path).as_posix(), _read_json(r / METRICS_FILE)) for r in runs]
    return sec


def read_cv(path: Path) -> ExperimentSection:
    """A cross-validation folder (``taemi cv``): its fold runs' headline metrics, the
    summary of ``cv.json``, the config, ``cv.png`` and ``cv.csv`` (one row per fold, then
    mean, std and pooled); its other CSVs (one row per clip) are not shown."""
    from taemi.experiments.cv import CV_CSV, CV_JSON, CV_PLOT, format_cv

    record = _read_json(path / CV_JSON)
    try:
        summary = format_cv(record)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"report: {path / CV_JSON} is not a cross-validation record ({e!r})"
        ) from None
    sec = ExperimentSection(path, summaries=[(CV_JSON, summary)])
    if (path / CONFIG_FILE).is_file():
        sec.summaries.append((CONFIG_FILE, _read_text(path / CONFIG_FILE)))
    if (path / CV_PLOT).is_file():
        sec.figures.append(Figure(path / CV_PLOT, CV_PLOT))
    if (path / CV_CSV).is_file():
        sec.tables.append((CV_CSV, read_table(path / CV_CSV)))
    sec.runs = [
        (r.relative_to(path).as_posix(), _read_json(r / METRICS_FILE)) for r in _nested_runs(path)
    ]
    return sec


def _by_value(table: Table, max_rows: int) -> Table:
    """The rows of a trials table, best value first (trials without a value last)."""
    col = table.header.index("value") if "value" in table.header else None

    def key(row: list[str]) -> float:
        try:
            return -float(row[col]) if col is not None else 0.0
        except (IndexError, ValueError):
            return float("inf")

    rows = sorted(table.rows, key=key)
    return Table(table.header, rows[:max_rows], table.total)


def read_sweep(path: Path) -> ExperimentSection:
    """A hyperparameter sweep folder (``taemi sweep``; it holds ``sweep.json``): the
    summary of ``sweep.json``, the best config's keys that differ from the base config,
    ``best_config.yaml``, the figures (objective per trial, parameter importance, parallel
    coordinates) and ``trials.csv`` best first (first :data:`MAX_CSV_ROWS` rows). The trial
    runs are not listed one by one (trials.csv names them)."""
    from taemi.config import ConfigError, flat_dict, load_config
    from taemi.experiments.sweep_folder import (
        BASE_CONFIG,
        BEST_CONFIG,
        PLOTS,
        SWEEP_JSON,
        TRIALS_CSV,
        format_sweep,
    )

    record = _read_json(path / SWEEP_JSON)
    try:
        summary = format_sweep(record)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"report: {path / SWEEP_JSON} is not a sweep record ({e!r})") from None
    sec = ExperimentSection(path, summaries=[(SWEEP_JSON, summary)])
    if (path / BEST_CONFIG).is_file() and (path / BASE_CONFIG).is_file():
        try:
            base = flat_dict(load_config(path / BASE_CONFIG).to_dict())
            best = flat_dict(load_config(path / BEST_CONFIG).to_dict())
        except ConfigError as e:
            raise ValueError(f"report: {e}") from None
        keys = [k for k in best if best[k] != base.get(k)]
        rows = [[k, _fmt(base.get(k)), _fmt(best[k])] for k in keys]
        sec.tables.append(
            (f"{BEST_CONFIG} vs {BASE_CONFIG}", Table(["key", "base", "best"], rows, len(rows)))
        )
        sec.summaries.append((BEST_CONFIG, _read_text(path / BEST_CONFIG)))
    sec.figures = [Figure(path / name, name) for name in PLOTS if (path / name).is_file()]
    if (path / TRIALS_CSV).is_file():
        table = _by_value(read_table(path / TRIALS_CSV), MAX_CSV_ROWS)
        sec.tables.append((f"{TRIALS_CSV} (best first)", table))
    return sec


def read_section(path: str | os.PathLike) -> RunSection | ExperimentSection:
    """Read DIR as a sweep folder (it holds ``sweep.json``), a cross-validation folder (it
    holds ``cv.json``), a run folder (it holds ``config.yaml``) or an experiment folder."""
    from taemi.experiments.cv import CV_JSON
    from taemi.experiments.sweep_folder import SWEEP_JSON

    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"report: {p} does not exist or is not a folder")
    if (p / SWEEP_JSON).is_file():
        return read_sweep(p)
    if (p / CV_JSON).is_file():
        return read_cv(p)
    if (p / CONFIG_FILE).is_file():
        return read_run(p)
    sec = read_experiment(p)
    if not (sec.figures or sec.tables or sec.summaries or sec.runs or sec.baselines):
        raise ValueError(
            f"report: {p} has nothing to report (no {CONFIG_FILE}, *.png, *.csv, summary.md "
            "or nested run folder)"
        )
    return sec


# --------------------------------------------------------------------------- numbers


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def metrics_rows(metrics: dict | None) -> tuple[list[tuple[str, str]], Table | None]:
    """Summary (label, value) pairs and a per-emotion Pearson/CCC table from metrics.json."""
    if metrics is None:
        return [("metrics", "no metrics.json (run not started or not from `taemi train`)")], None
    valid = metrics.get("valid")
    summary: list[tuple[str, str]] = []
    table = None
    if valid:
        summary += [
            ("mean Pearson", _fmt(valid.get("mean_pearson"))),
            ("mean CCC", _fmt(valid.get("mean_ccc"))),
            ("MSE", _fmt(valid.get("mse"))),
            ("n (validation clips)", _fmt(valid.get("n"))),
            ("clipped", _fmt(valid.get("clipped"))),
        ]
        pearson, ccc = valid.get("pearson") or {}, valid.get("ccc") or {}
        names = list(pearson) + [e for e in ccc if e not in pearson]
        rows = [[e, _fmt(pearson.get(e)), _fmt(ccc.get(e))] for e in names]
        table = Table(["emotion", "Pearson r", "CCC"], rows, len(rows))
    else:
        summary.append(
            ("validation", f"none (trained on all, {_fmt(metrics.get('fixed_epochs'))} epochs)")
        )
    summary += [
        ("best epoch", _fmt(metrics.get("best_epoch"))),
        ("epochs run", _fmt(metrics.get("epochs_run"))),
        ("stopped early", _fmt(metrics.get("stopped_early"))),
        ("finished", _fmt(metrics.get("finished"))),
        ("train clips", _fmt(metrics.get("train_clips"))),
    ]
    return summary, table


HEADLINE = [
    "run",
    "mean Pearson",
    "mean CCC",
    "MSE",
    "n",
    "best epoch",
    "epochs run",
    "stopped early",
]


def headline_row(name: str, metrics: dict | None) -> list[str]:
    m = metrics or {}
    v = m.get("valid") or {}
    return [
        name,
        _fmt(v.get("mean_pearson")),
        _fmt(v.get("mean_ccc")),
        _fmt(v.get("mse")),
        _fmt(v.get("n")),
        _fmt(m.get("best_epoch")),
        _fmt(m.get("epochs_run")),
        _fmt(m.get("stopped_early")),
    ]


BASELINE_HEADER = [
    "baseline",
    "seeds",
    "valid mean Pearson",
    "std over seeds",
    "mean CCC",
    "chosen on valid",
]


def baselines_table(data: dict) -> Table:
    """The simple models of a ``baselines.json``: one row per model and feature set."""
    rows = [
        [
            str(s.get("name")),
            _fmt(s.get("n")),
            _fmt(s.get("mean")),
            "deterministic" if s.get("deterministic") else _fmt(s.get("std")),
            _fmt(s.get("mean_ccc")),
            "; ".join(dict.fromkeys(str(h) for h in s.get("hyper") or [])),
        ]
        for s in data["summary"]
    ]
    return Table(BASELINE_HEADER, rows, len(rows))


def fusion_gain(sec: ExperimentSection, data: dict) -> str:
    """What the best run of the folder gains over the best simple model (valid mean Pearson)."""
    best = max(data["summary"], key=lambda s: s.get("mean", float("-inf")), default=None)
    if best is None:
        return "no simple model in this file"
    scored = [
        (n, m["valid"]["mean_pearson"])
        for n, m in sec.runs
        if m and isinstance(m.get("valid"), dict) and m["valid"].get("mean_pearson") is not None
    ]
    base = f"best simple model: {best['name']} {best['mean']:.4f}"
    if not scored:
        return base + " (no trained run with validation metrics in this folder to compare)"
    name, score = max(scored, key=lambda x: x[1])
    return f"{base}; best run {name} {score:.4f}: gain over the simple model {score - best['mean']:+.4f}"


# --------------------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #444; }
h2 { border-bottom: 1px solid #aaa; margin-top: 2.5em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
pre { background: #f7f7f7; border: 1px solid #ddd; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .note { color: #666; font-size: 0.85em; }
details summary { cursor: pointer; margin: 0.4em 0; }
"""


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _html_table(t: Table, note: str | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in t.rows)
    out = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if t.total > len(t.rows):
        out += f'<p class="note">first {len(t.rows)} of {t.total} rows</p>'
    if note:
        out += f'<p class="note">{_e(note)}</p>'
    return out


def _html_pairs(pairs: Sequence[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in pairs)
    return f"<table><tbody>{rows}</tbody></table>"


def _data_uri(path: Path) -> str:
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"report: {path} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _html_figures(figs: Iterable[Figure]) -> str:
    return "".join(
        f'<figure><img src="{_data_uri(f.path)}" alt="{_e(f.caption)}"><figcaption>{_e(f.caption)}</figcaption></figure>'
        for f in figs
    )


def _html_run(sec: RunSection, title: str) -> str:
    parts = [
        f"<h2>{_e(title)}</h2>",
        f'<p class="note">run folder {_e(sec.path)}</p>',
        "<h3>Metrics</h3>",
    ]
    summary, per_emotion = metrics_rows(sec.metrics)
    parts.append(_html_pairs(summary))
    if per_emotion is not None:
        parts.append(_html_table(per_emotion))
    parts.append("<h3>Config</h3>")
    if sec.preset is None:
        parts.append('<p class="note">unknown preset: no comparison</p>')
    elif sec.config_diff:
        t = Table(
            ["key", f"preset {sec.preset}", "this run"],
            [[k, _fmt(a), _fmt(b)] for k, a, b in sec.config_diff],
            len(sec.config_diff),
        )
        parts.append(_html_table(t))
    else:
        parts.append(f'<p class="note">the {_e(sec.preset)} preset, unchanged</p>')
    parts.append(
        f"<details><summary>config.yaml</summary><pre>{_e(sec.config_text)}</pre></details>"
    )
    if sec.features_text is not None:
        parts.append(
            f"<details><summary>features.json</summary><pre>{_e(sec.features_text)}</pre></details>"
        )
    if sec.figures:
        parts += ["<h3>Plots</h3>", _html_figures(sec.figures)]
    if sec.history is not None:
        parts += ["<h3>History</h3>", _html_table(sec.history)]
    return "\n".join(parts)


def _html_experiment(sec: ExperimentSection, title: str) -> str:
    parts = [f"<h2>{_e(title)}</h2>", f'<p class="note">experiment folder {_e(sec.path)}</p>']
    if sec.runs:
        rows = [headline_row(n, m) for n, m in sec.runs]
        parts += ["<h3>Runs</h3>", _html_table(Table(HEADLINE, rows, len(rows)))]
    for name, data in sec.baselines:
        parts += [
            f"<h3>Simple baselines ({_e(name)})</h3>",
            _html_table(baselines_table(data), note=fusion_gain(sec, data)),
        ]
    for name, text in sec.summaries:
        parts += [f"<h3>{_e(name)}</h3>", f"<pre>{_e(text)}</pre>"]
    if sec.figures:
        parts += ["<h3>Figures</h3>", _html_figures(sec.figures)]
    for name, t in sec.tables:
        parts += [f"<h3>{_e(name)}</h3>", _html_table(t)]
    return "\n".join(parts)


def render_html(sections: Sequence[RunSection | ExperimentSection], titles: Sequence[str]) -> str:
    body = []
    toc = "".join(f'<li><a href="#s{i}">{_e(t)}</a></li>' for i, t in enumerate(titles))
    for i, (sec, title) in enumerate(zip(sections, titles)):
        inner = (
            _html_run(sec, title) if isinstance(sec, RunSection) else _html_experiment(sec, title)
        )
        body.append(f'<section id="s{i}">{inner}</section>')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>TAEMI report</title><style>{CSS}</style></head><body>\n"
        f"<h1>TAEMI report</h1><ul>{toc}</ul>\n" + "\n".join(body) + "\n</body></html>\n"
    )


# --------------------------------------------------------------------------- Markdown


def _m(s: Any) -> str:
    """Escape text for a Markdown paragraph or table cell."""
    return html.escape(str(s), quote=False).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> list[str]:
    width = max([len(t.header)] + [len(r) for r in t.rows]) or 1
    header = list(t.header) + [""] * (width - len(t.header))
    out = ["| " + " | ".join(_m(h) for h in header) + " |", "|" + "---|" * width]
    out += [
        "| " + " | ".join(_m(c) for c in list(r) + [""] * (width - len(r))) + " |" for r in t.rows
    ]
    if t.total > len(t.rows):
        out.append(f"\n_first {len(t.rows)} of {t.total} rows_")
    return out + [""]


def _md_pre(text: str, lang: str = "") -> list[str]:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + lang, text.rstrip("\n"), fence, ""]


class _MdFigures:
    """Copies figures into the files folder and hands out relative links."""

    def __init__(self, md_path: Path) -> None:
        self.dir = md_path.parent / f"{md_path.stem}_files"
        self.rel = self.dir.name
        self.n = 0

    def link(self, fig: Figure) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n += 1
        name = f"{self.n:03d}_" + re.sub(r"[^A-Za-z0-9._-]+", "_", fig.caption)
        shutil.copyfile(fig.path, self.dir / name)
        return f"![{_m(fig.caption)}]({self.rel}/{name})"


def _md_run(sec: RunSection, title: str, figs: _MdFigures) -> list[str]:
    out = [f"## {_m(title)}", "", f"Run folder `{sec.path}`", "", "### Metrics", ""]
    summary, per_emotion = metrics_rows(sec.metrics)
    out += _md_table(Table(["", ""], [list(p) for p in summary], len(summary)))
    if per_emotion is not None:
        out += _md_table(per_emotion)
    out += ["### Config", ""]
    if sec.preset is None:
        out += ["Unknown preset: no comparison.", ""]
    elif sec.config_diff:
        rows = [[k, _fmt(a), _fmt(b)] for k, a, b in sec.config_diff]
        out += _md_table(Table(["key", f"preset {sec.preset}", "this run"], rows, len(rows)))
    else:
        out += [f"The {_m(sec.preset)} preset, unchanged.", ""]
    out += (
        ["<details><summary>config.yaml</summary>", ""]
        + _md_pre(sec.config_text or "", "yaml")
        + ["</details>", ""]
    )
    if sec.figures:
        out += ["### Plots", ""] + [figs.link(f) + "\n" for f in sec.figures]
    if sec.history is not None:
        out += ["### History", ""] + _md_table(sec.history)
    return out


def _md_experiment(sec: ExperimentSection, title: str, figs: _MdFigures) -> list[str]:
    out = [f"## {_m(title)}", "", f"Experiment folder `{sec.path}`", ""]
    if sec.runs:
        rows = [headline_row(n, m) for n, m in sec.runs]
        out += ["### Runs", ""] + _md_table(Table(HEADLINE, rows, len(rows)))
    for name, data in sec.baselines:
        out += [f"### Simple baselines ({_m(name)})", ""] + _md_table(baselines_table(data))
        out += [_m(fusion_gain(sec, data)), ""]
    for name, text in sec.summaries:
        out += [f"### {_m(name)}", ""] + _md_pre(text)
    if sec.figures:
        out += ["### Figures", ""] + [figs.link(f) + "\n" for f in sec.figures]
    for name, t in sec.tables:
        out += [f"### {_m(name)}", ""] + _md_table(t)
    return out


def render_markdown(
    sections: Sequence[RunSection | ExperimentSection], titles: Sequence[str], md_path: Path
) -> str:
    """Markdown text; figures are copied into ``<md stem>_files/`` next to ``md_path``."""
    figs = _MdFigures(md_path)
    if figs.dir.exists():
        shutil.rmtree(figs.dir)  # a previous report's figures would otherwise linger
    out = ["# TAEMI report", ""]
    for sec, title in zip(sections, titles):
        out += (
            _md_run(sec, title, figs)
            if isinstance(sec, RunSection)
            else _md_experiment(sec, title, figs)
        )
    return "\n".join(out).rstrip("\n") + "\n"


# --------------------------------------------------------------------------- entry point


def _titles(dirs: Sequence[Path]) -> list[str]:
    names = [d.resolve().name or str(d) for d in dirs]
    return [str(d) if names.count(n) > 1 else n for d, n in zip(dirs, names)]


def build_report(
    dirs: Sequence[str | os.PathLike],
    out_html: str | os.PathLike | None = None,
    out_md: str | os.PathLike | None = None,
) -> str:
    """Report on ``dirs`` (run or experiment folders, one section each); returns the HTML.

    Writes the HTML to ``out_html`` and the Markdown to ``out_md`` when given (the
    Markdown's figures go to ``<out_md stem>_files/`` beside it). Raises ValueError naming
    a DIR that does not exist or has nothing to report.
    """
    if not dirs:
        raise ValueError("report: no folders given")
    paths = [Path(d) for d in dirs]
    sections = [read_section(p) for p in paths]
    titles = _titles(paths)
    text = render_html(sections, titles)
    if out_html is not None:
        Path(out_html).parent.mkdir(parents=True, exist_ok=True)
        Path(out_html).write_text(text, encoding="utf-8")
        log.info("wrote %s", out_html)
    if out_md is not None:
        md_path = Path(out_md)
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(render_markdown(sections, titles, md_path), encoding="utf-8")
        log.info("wrote %s", md_path)
    return text
