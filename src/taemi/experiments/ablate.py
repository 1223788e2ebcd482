"""The paper's ablation tables as one resumable grid of training runs.

Zhu et al. (arXiv 2603.14976): Table 3 (leave one part out), Table 4 (the anchor
modality) and Table 2's baseline categories (docs/method.md section 7). Every variant is a
preset plus configuration, trained over several seeds on the same store and splits;
a run whose ``metrics.json`` says it finished is reused when the grid is run again.

Baselines with fewer modalities keep the TAEMI architecture and hide the other
modalities from it (``data.modalities``): they are always "missing", so the model sees
only their constant missing token and learns from the kept modalities alone. The
``baselines`` grid also fits the simple models of :mod:`taemi.experiments.baselines`
(ridge and an MLP on pooled features of each modality and of all three) and writes them
as rows next to those variants: ridge once (deterministic), the MLP once per seed.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from taemi.config import build_config
from taemi.experiments.baselines import FEATURE_SETS, MODELS
from taemi.run import has_run, read_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    name: str  # row label and run folder name
    preset: str  # starting preset
    overrides: tuple[tuple[str, str], ...] = ()  # extra config keys
    paper: float | None = None  # the paper's reported valid mean Pearson (docs/method.md section 7)


TABLE3 = (
    Variant("full", "paper", (), 0.55),
    Variant("simple_concat", "concat", (), 0.45),
    Variant("without_text_anchored_ca", "self_attention", (), 0.48),
    Variant("without_learned_tokens", "zeros_tokens", (), 0.52),
    Variant("without_modality_dropout", "no_modality_dropout", (), 0.51),
)
TABLE4 = (
    Variant("anchor_text", "paper", (), 0.55),
    Variant("anchor_audio", "anchor_audio", (), 0.51),
    Variant("anchor_vision", "anchor_vision", (), 0.39),
)
BASELINES = (
    Variant("audio_only", "concat", (("data.modalities", "audio"),), 0.24),
    Variant("vision_only", "concat", (("data.modalities", "vision"),), 0.09),
    Variant("text_only", "concat", (("data.modalities", "text"),), None),
    Variant("audio_vision", "concat", (("data.modalities", "audio,vision"),), 0.25),
    Variant("all_concat", "concat", (), 0.45),
)
GRIDS = {"table3": TABLE3, "table4": TABLE4, "baselines": BASELINES}


@dataclass(frozen=True)
class SimpleBaseline:
    """A row of a simple model on pooled features (:mod:`taemi.experiments.baselines`)."""

    name: str  # row label: "<model>_<features>"
    model: str  # ridge | mlp
    features: str  # audio | vision | text | all
    paper: float | None = None  # the paper reports none

    @property
    def deterministic(self) -> bool:
        return self.model == "ridge"  # closed form: one value, whatever the seed


SIMPLE_BASELINES = tuple(SimpleBaseline(f"{m}_{f}", m, f) for m in MODELS for f in FEATURE_SETS)
#: Subfolder of a grid's folder holding the simple models' own outputs (taemi baselines').
SIMPLE_DIR = "baselines"


def simple_baselines(grid: str) -> tuple[SimpleBaseline, ...]:
    """The simple-model rows of ``grid``: those of the ``baselines`` grid only (``all``
    leaves them out; run ``--grid baselines`` or ``taemi baselines`` for them)."""
    return SIMPLE_BASELINES if grid == "baselines" else ()


def grid_variants(grid: str) -> tuple[Variant, ...]:
    if grid == "all":
        seen: dict[str, Variant] = {}
        for g in GRIDS.values():
            for v in g:
                seen.setdefault(v.name, v)
        return tuple(seen.values())
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; expected one of {', '.join([*GRIDS, 'all'])}")
    return GRIDS[grid]


def _run_one(job: dict) -> dict:
    """Train one (variant, seed) in this process; returns its result row."""
    from taemi.data.labels import read_labels
    from taemi.store import FeatureStore
    from taemi.train.modes import config_for_store
    from taemi.train.trainer import train

    store = FeatureStore(job["store"])
    overrides = [*job["overrides"], *job["extra"], ("train.seed", job["seed"])]
    cfg = config_for_store(
        job["preset"], overrides, store
    )  # input sizes: the store's, unless overridden
    kw = {"emotions": cfg.data.emotions, "store_ids": store}
    run = Path(job["run"])
    res = train(
        cfg,
        store,
        read_labels(job["train"], **kw),
        read_labels(job["valid"], **kw),
        run,
        resume=has_run(run),
        progress=False,
    )
    return _row(job, res.best_epoch, res.best.to_dict())


def _row(job: dict, best_epoch: int, valid: dict) -> dict:
    return {
        "variant": job["variant"],
        "seed": job["seed"],
        "run": job["run"],
        "best_epoch": best_epoch,
        "mean_pearson": valid["mean_pearson"],
        **{f"pearson_{e}": r for e, r in valid["pearson"].items()},
        "paper": job["paper"],
    }


def ablate(
    store: str | Path,
    train_csv: str | Path,
    valid_csv: str | Path,
    out: str | Path,
    *,
    grid: str = "all",
    seeds: int = 3,
    first_seed: int = 3407,
    overrides: tuple[tuple[str, str], ...] = (),
    jobs: int = 1,
) -> list[dict]:
    """Train every variant of ``grid`` over ``seeds`` seeds into ``out/runs/<variant>/seed<k>``;
    write ``results.csv``, ``summary.md``, ``summary.json`` and plots; return the rows."""
    out = Path(out)
    variants = grid_variants(grid)
    for v in variants:  # fail fast on a bad preset/override before any training
        build_config(v.preset, [*v.overrides, *overrides])
    todo, rows = [], []
    first_of: dict[tuple, str] = {}  # identical configs (anchor_text == full, ...) share their runs
    for v in variants:
        same_as = first_of.setdefault((v.preset, v.overrides), v.name)
        for k in range(seeds):
            seed = first_seed + k
            run = out / "runs" / same_as / f"seed{seed}"
            job = {
                "variant": v.name,
                "preset": v.preset,
                "overrides": v.overrides,
                "extra": overrides,
                "seed": seed,
                "run": str(run),
                "store": str(store),
                "train": str(train_csv),
                "valid": str(valid_csv),
                "paper": v.paper,
            }
            m = read_metrics(run)
            if m is not None and m.get("finished"):
                rows.append(_row(job, m["best_epoch"], m["valid"]))
            else:
                todo.append(job)
    log.info(
        "ablation grid %s: %d runs, %d already finished, %d to train",
        grid,
        len(rows) + len(todo),
        len(rows),
        len(todo),
    )
    unique = list({j["run"]: j for j in todo}.values())  # a shared run is trained once
    if jobs > 1 and len(unique) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            trained = dict(zip([j["run"] for j in unique], pool.map(_run_one, unique)))
    else:
        trained = {j["run"]: _run_one(j) for j in unique}
    rows += [{**trained[j["run"]], "variant": j["variant"], "paper": j["paper"]} for j in todo]
    order = {v.name: i for i, v in enumerate(variants)}
    rows.sort(key=lambda r: (order[r["variant"]], r["seed"]))
    simple = simple_baselines(grid)
    if simple:
        rows += _simple_rows(
            store, train_csv, valid_csv, out, [first_seed + k for k in range(seeds)], overrides
        )
    _write_outputs(out, rows, (*variants, *simple))
    return rows


def _simple_rows(
    store: str | Path,
    train_csv: str | Path,
    valid_csv: str | Path,
    out: Path,
    seeds: list[int],
    overrides: tuple[tuple[str, str], ...],
) -> list[dict]:
    """Fit the simple baselines (ridge once, the MLP per seed), write their outputs into
    ``out/baselines/`` and return their result rows (``run``: their baselines.json)."""
    from taemi.data.labels import read_labels
    from taemi.experiments.baselines import (
        RESULTS_JSON,
        BaselineSettings,
        run_baselines,
        write_baselines,
    )
    from taemi.store import FeatureStore

    fs = FeatureStore(store)
    kw = {"emotions": build_config("paper", list(overrides)).data.emotions, "store_ids": fs}
    settings = BaselineSettings()
    results = run_baselines(
        fs, read_labels(train_csv, **kw), read_labels(valid_csv, **kw), settings, seeds=seeds
    )
    folder = out / SIMPLE_DIR
    inputs = {"store": str(store), "train": str(train_csv), "valid": str(valid_csv)}
    write_baselines(folder, results, settings, {**inputs, "seeds": seeds})
    return [
        {
            "variant": r.name,
            "seed": "" if r.seed is None else r.seed,
            "run": str(folder / RESULTS_JSON),
            "best_epoch": r.hyper.get("epochs", ""),
            "mean_pearson": r.valid["mean_pearson"],
            **{f"pearson_{e}": x for e, x in r.valid["pearson"].items()},
            "paper": None,
        }
        for r in results
    ]


def summarise(rows: list[dict], variants: tuple[Variant | SimpleBaseline, ...]) -> list[dict]:
    """Mean and std over seeds per variant, the delta to the first variant, the paper's
    value; ``deterministic`` for a simple model with one value whatever the seed (ridge)."""
    out = []
    for v in variants:
        vals = [r["mean_pearson"] for r in rows if r["variant"] == v.name]
        if not vals:
            continue
        emo = sorted(k for k in rows[0] if k.startswith("pearson_"))
        per = {
            k[len("pearson_") :]: statistics.fmean(r[k] for r in rows if r["variant"] == v.name)
            for k in emo
        }
        out.append(
            {
                "variant": v.name,
                "n": len(vals),
                "mean": statistics.fmean(vals),
                "std": statistics.stdev(vals) if len(vals) > 1 else math.nan,
                "per_emotion": per,
                "paper": v.paper,
                "deterministic": getattr(v, "deterministic", False),
            }
        )
    if out:
        ref = out[0]["mean"]
        for s in out:
            s["delta"] = s["mean"] - ref
    return out


def _write_outputs(
    out: Path, rows: list[dict], variants: tuple[Variant | SimpleBaseline, ...]
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = summarise(rows, variants)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    lines = [
        "| variant | seeds | mean Pearson (mean +- std) | delta to first row | paper |",
        "|---|---|---|---|---|",
    ]
    for s in summary:
        paper = "-" if s["paper"] is None else f"{s['paper']:.2f}"
        spread = "(deterministic)" if s["deterministic"] else f"+- {s['std']:.4f}"
        lines.append(
            f"| {s['variant']} | {s['n']} | {s['mean']:.4f} {spread} | {s['delta']:+.4f} | {paper} |"
        )
    if any(isinstance(v, SimpleBaseline) for v in variants):
        lines += [
            "",
            (
                "ridge_* and mlp_*: simple models on pooled features (mean over valid steps, "
                "text sentence vector, missing indicators), hyperparameters chosen on the "
                "validation split; ridge is deterministic (one value), the MLP ran once per "
                f"seed. Details: {SIMPLE_DIR}/baselines.json."
            ),
        ]
    emotions = list(summary[0]["per_emotion"]) if summary else []
    lines += [
        "",
        "Per emotion (mean over seeds):",
        "",
        "| variant | " + " | ".join(emotions) + " |",
        "|---|" + "---|" * len(emotions),
    ]
    for s in summary:
        lines.append(
            f"| {s['variant']} | "
            + " | ".join(f"{s['per_emotion'][e]:.3f}" for e in emotions)
            + " |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plots(out, summary)


def _plots(out: Path, summary: list[dict]) -> None:
    from taemi.train.plots import pyplot

    plt = pyplot()
    names = [s["variant"] for s in summary]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    ax.bar(
        range(len(names)),
        [s["mean"] for s in summary],
        yerr=[0 if math.isnan(s["std"]) else s["std"] for s in summary],
        capsize=4,
        color="C0",
        label="taemi",
    )
    papers = [(i, s["paper"]) for i, s in enumerate(summary) if s["paper"] is not None]
    if papers:
        ax.scatter(
            [i for i, _ in papers],
            [p for _, p in papers],
            color="C3",
            marker="D",
            zorder=3,
            label="paper",
        )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("valid mean Pearson")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=100)
    plt.close(fig)

    emotions = list(summary[0]["per_emotion"])
    data = [[s["per_emotion"][e] for e in emotions] for s in summary]
    fig, ax = plt.subplots(figsize=(1.2 * len(emotions) + 3, 0.5 * len(names) + 2))
    im = ax.imshow(data, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(emotions)), emotions, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label="Pearson r")
    fig.tight_layout()
    fig.savefig(out / "per_emotion_heatmap.png", dpi=100)
    plt.close(fig)
