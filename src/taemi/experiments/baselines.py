"""Simple models on pooled features: what the fusion model has to beat.

Each baseline sees one fixed-length vector per clip, built from the feature store:

- audio and vision: the mean over the sequence's valid steps (the store keeps exactly
  the valid steps of each clip, so nothing padded enters the mean);
- text: the sentence vector (token states, when stored, are not used);
- a missing modality: zeros for its block after standardisation (= the training mean)
  plus a missing-indicator feature (1 = missing).

Each block is standardised with the training split's statistics, computed over the
training clips where the modality is present (a column of constant value gets scale 1).
Feature sets: each modality alone (``audio``, ``vision``, ``text``) and all three
concatenated (``all``).

Two models per feature set:

- ``ridge``: closed-form ridge regression with an intercept (numpy, one SVD of the
  centred training matrix, then every alpha of the log grid at no extra cost); alpha is
  chosen by the validation mean Pearson (the challenge score), ties to the larger alpha.
  Deterministic: one value, no seeds.
- ``mlp``: one hidden layer (ReLU) trained with Adam on the MSE, on the CPU in float32;
  the L2 weight decay is chosen from a small grid and the number of epochs by early
  stopping, both on the validation mean Pearson. Deterministic given its seed (the
  initialisation and the batch order come from a private generator; one torch thread).
  With more features than training clips it sees the clips' coordinates in the
  principal axes of the training matrix (:func:`span_coordinates`): the same
  information in fewer columns, several times faster.

Both choose their hyperparameters on the validation split and are scored on it, as the
fusion model's early stopping is: the numbers compare like with like, and are slightly
optimistic for all of them alike.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from taemi import MODALITIES
from taemi.data.labels import Labels
from taemi.eval.metrics import compute_metrics
from taemi.store import FeatureStore

log = logging.getLogger(__name__)

#: The feature sets: each modality alone and all three concatenated.
FEATURE_SETS: tuple[str, ...] = ("audio", "vision", "text", "all")
#: The simple models.
MODELS: tuple[str, ...] = ("ridge", "mlp")
#: Files written by :func:`write_baselines`.
RESULTS_JSON = "baselines.json"
RESULTS_CSV = "baselines.csv"
PLOT_FILE = "baselines.png"
SETTINGS_FILE = "settings.json"


@dataclass(frozen=True)
class BaselineSettings:
    """What :func:`run_baselines` trains and how it chooses hyperparameters."""

    models: tuple[str, ...] = MODELS  # which simple models (ridge, mlp)
    feature_sets: tuple[str, ...] = FEATURE_SETS  # audio, vision, text, all
    alphas: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 5, 15))  # ridge grid
    mlp_hidden: int = 256  # width of the MLP's hidden layer
    mlp_weight_decays: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)  # Adam (coupled) L2 grid
    mlp_lr: float = 1e-3  # Adam learning rate
    mlp_batch_size: int = 64  # clips per MLP step
    mlp_max_epochs: int = 60  # upper bound of the early-stopped epochs
    mlp_patience: int = 8  # epochs without a better valid mean Pearson before stopping

    def __post_init__(self) -> None:
        for name in ("models", "feature_sets", "alphas", "mlp_weight_decays"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and its value."""
        bad = [m for m in self.models if m not in MODELS]
        if not self.models or bad:
            raise ValueError(f"baselines: models {list(self.models)}: expected some of {MODELS}")
        bad = [f for f in self.feature_sets if f not in FEATURE_SETS]
        if not self.feature_sets or bad:
            raise ValueError(
                f"baselines: feature sets {list(self.feature_sets)}: expected some of {FEATURE_SETS}"
            )
        if not self.alphas or not all(math.isfinite(a) and a > 0 for a in self.alphas):
            raise ValueError(f"baselines: alphas {list(self.alphas)} must be finite and > 0")
        if not self.mlp_weight_decays or not all(
            math.isfinite(w) and w >= 0 for w in self.mlp_weight_decays
        ):
            raise ValueError(
                f"baselines: mlp_weight_decays {list(self.mlp_weight_decays)} must be finite and >= 0"
            )
        for name in ("mlp_hidden", "mlp_batch_size", "mlp_max_epochs", "mlp_patience"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"baselines: {name}={v!r} must be an int >= 1")
        if not (math.isfinite(self.mlp_lr) and self.mlp_lr > 0):
            raise ValueError(f"baselines: mlp_lr={self.mlp_lr!r} must be finite and > 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BaselineResult:
    """One simple model on one feature set, scored on the validation split."""

    name: str  # "<model>_<features>", e.g. ridge_audio
    model: str  # ridge | mlp
    features: str  # audio | vision | text | all
    seed: int | None  # the MLP's seed; None for ridge (deterministic)
    hyper: dict  # the chosen hyperparameters: {"alpha"} or {"weight_decay", "epochs"}
    at_grid_edge: bool  # the chosen alpha / weight decay is the grid's smallest or largest
    n_features: int  # input width (pooled features + missing indicators)
    valid: dict  # Metrics.to_dict() of the validation predictions (raw, not clipped)
    search: list[dict] = field(default_factory=list)  # per grid value: its valid mean Pearson

    @property
    def hyper_text(self) -> str:
        if self.model == "ridge":
            return f"alpha={self.hyper['alpha']:.3g}"
        return f"weight_decay={self.hyper['weight_decay']:g}, epochs={self.hyper['epochs']}"


# --------------------------------------------------------------------------- pooled features


@dataclass
class Pooled:
    """Per modality: (N, D) float64 means over valid steps (rows of missing clips: 0) and
    (N,) missing flags, for ``ids`` in order."""

    ids: list[str]
    values: dict[str, np.ndarray]  # modality -> (N, D_m)
    missing: dict[str, np.ndarray]  # modality -> (N,) bool


def pool_store(store: FeatureStore, ids: Sequence[str]) -> Pooled:
    """Mean over each sequence's valid steps (audio, vision) and the sentence vector (text),
    in float64; a missing modality gives a zero row and its flag set."""
    n = len(ids)
    values = {m: np.zeros((n, store.dims[m]), dtype=np.float64) for m in MODALITIES}
    missing = {m: np.zeros(n, dtype=bool) for m in MODALITIES}
    for i, clip_id in enumerate(ids):
        clip = store.get(clip_id)
        for m in MODALITIES:
            x = getattr(clip, m)  # (T, D) valid steps only, or (D,) for text, or None
            if x is None:
                missing[m][i] = True
            elif x.ndim == 2:
                values[m][i] = np.asarray(x, dtype=np.float64).mean(axis=0)  # (D,)
            else:
                values[m][i] = np.asarray(x, dtype=np.float64)
    return Pooled(list(ids), values, missing)


@dataclass
class Standardiser:
    """Per-modality train mean and scale (over present clips) of pooled features."""

    mean: dict[str, np.ndarray]
    scale: dict[str, np.ndarray]

    @classmethod
    def fit(cls, train: Pooled) -> Standardiser:
        mean, scale = {}, {}
        for m, x in train.values.items():
            present = x[~train.missing[m]]  # (N_present, D)
            if len(present) == 0:
                mean[m] = np.zeros(x.shape[1])
                scale[m] = np.ones(x.shape[1])
                continue
            mean[m] = present.mean(axis=0)
            sd = present.std(axis=0)
            scale[m] = np.where(sd > 1e-12, sd, 1.0)
        return cls(mean, scale)

    def matrix(self, pooled: Pooled, features: str) -> np.ndarray:
        """(N, sum D_m + #modalities) design matrix of a feature set: standardised blocks
        (zeros where missing) each followed by its missing indicator."""
        mods = MODALITIES if features == "all" else (features,)
        blocks = []
        for m in mods:
            z = (pooled.values[m] - self.mean[m]) / self.scale[m]  # (N, D_m)
            miss = pooled.missing[m]
            z[miss] = 0.0
            blocks += [z, miss[:, None].astype(np.float64)]
        return np.concatenate(blocks, axis=1)


# --------------------------------------------------------------------------- models


def _mean_pearson(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean over columns of Pearson r, a constant column counting 0 (quiet, for searches)."""
    p = pred - pred.mean(axis=0)
    t = target - target.mean(axis=0)
    den = np.linalg.norm(p, axis=0) * np.linalg.norm(t, axis=0)
    r = np.where(den > 0, (p * t).sum(axis=0) / np.where(den > 0, den, 1.0), 0.0)
    return float(r.mean())


def ridge_path(
    x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, alphas: Sequence[float]
) -> list[np.ndarray]:
    """Ridge predictions (N_eval, E) on ``x_eval`` for each alpha, with an unpenalised
    intercept (X and Y centred on the training means).

    One eigendecomposition of the smaller Gram matrix serves every alpha: with more
    features than clips the dual form, pred = (Xe Xc^T) U diag(1 / (l + alpha)) U^T Yc
    where Xc Xc^T = U diag(l) U^T; otherwise the primal form with Xc^T Xc. (An SVD of Xc
    gives the same, but is 10-100x slower when other processes load the BLAS threads.)"""
    mx, my = x_train.mean(axis=0), y_train.mean(axis=0)
    xc, yc = x_train - mx, y_train - my  # (N, P), (N, E)
    xe = x_eval - mx  # (N_eval, P)
    if xc.shape[1] > xc.shape[0]:  # dual: N x N
        lam, u = np.linalg.eigh(xc @ xc.T)  # (N,), (N, N)
        left = (xe @ xc.T) @ u  # (N_eval, N)
        right = u.T @ yc  # (N, E)
    else:  # primal: P x P
        lam, u = np.linalg.eigh(xc.T @ xc)  # (P,), (P, P)
        left = xe @ u  # (N_eval, P)
        right = u.T @ (xc.T @ yc)  # (P, E)
    lam = np.clip(lam, 0.0, None)  # round-off can make the smallest slightly negative
    return [left @ (right / (lam + a)[:, None]) + my for a in alphas]


def fit_ridge(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_valid: np.ndarray,
    y_valid: np.ndarray,
    alphas: Sequence[float],
) -> tuple[float, np.ndarray, list[dict]]:
    """(chosen alpha, its valid predictions (N, E), the search): the alpha with the best
    valid mean Pearson, ties to the larger alpha."""
    preds = ridge_path(x_train, y_train, x_valid, alphas)
    scores = [_mean_pearson(p, y_valid) for p in preds]
    best = max(range(len(alphas)), key=lambda i: (round(scores[i], 12), alphas[i]))
    search = [{"alpha": float(a), "mean_pearson": s} for a, s in zip(alphas, scores)]
    return float(alphas[best]), preds[best], search


def span_coordinates(x_train: np.ndarray, x_eval: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of the centred rows in the principal axes of the centred training matrix,
    (N, K) and (N_eval, K) with K <= min(N, P): a rotation that keeps every dot product
    between training rows, and projects evaluation rows onto the training span. An MLP's
    first layer sees the same information in K instead of P columns (gradient steps move
    its weights only within that span)."""
    mx = x_train.mean(axis=0)
    xc, xe = x_train - mx, x_eval - mx  # (N, P), (N_eval, P)
    if xc.shape[1] <= xc.shape[0]:
        return xc, xe
    lam, u = np.linalg.eigh(xc @ xc.T)  # (N,), (N, N)
    keep = lam > 1e-9 * max(lam.max(), 1e-300)
    lam, u = lam[keep], u[:, keep]  # (K,), (N, K)
    root = np.sqrt(lam)
    return u * root, (xe @ xc.T) @ u / root  # (N, K), (N_eval, K)


def fit_mlp(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_valid: np.ndarray,
    y_valid: np.ndarray,
    settings: BaselineSettings,
    seed: int,
) -> tuple[dict, np.ndarray, list[dict]]:
    """({"weight_decay", "epochs"}, valid predictions (N, E) of the chosen model, the
    search): per weight decay an early-stopped MLP, the best valid mean Pearson wins.

    With more features than training clips the inputs are their training-span
    coordinates (:func:`span_coordinates`). Runs on one torch thread (the matrices are
    small: more threads only add synchronisation, and the result then depends on no
    machine's core count); the caller's thread setting is restored."""
    import torch

    z_train, z_valid = span_coordinates(x_train, x_valid)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_mlp(z_train, y_train, z_valid, y_valid, settings, seed)
    finally:
        torch.set_num_threads(before)


def _fit_mlp(x_train, y_train, x_valid, y_valid, settings, seed):
    import torch

    xt = torch.as_tensor(x_train, dtype=torch.float32)  # (N, K)
    yt = torch.as_tensor(y_train, dtype=torch.float32)  # (N, E)
    xv = torch.as_tensor(x_valid, dtype=torch.float32)  # (N_v, K)
    best: tuple[float, dict, np.ndarray] | None = None
    search = []
    for wd in settings.mlp_weight_decays:
        gen = torch.Generator().manual_seed(seed)  # the same start and order for every decay
        net = torch.nn.Sequential(
            torch.nn.Linear(xt.shape[1], settings.mlp_hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(settings.mlp_hidden, yt.shape[1]),
        )
        with torch.no_grad():  # initialise from the private generator, not the global one
            for layer in (net[0], net[2]):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.uniform_(-bound, bound, generator=gen)
        opt = torch.optim.Adam(net.parameters(), lr=settings.mlp_lr, weight_decay=wd)
        top: tuple[float, int, np.ndarray | None] = (-math.inf, 0, None)  # score, epoch, pred
        for epoch in range(1, settings.mlp_max_epochs + 1):
            net.train()
            order = torch.randperm(len(xt), generator=gen)
            for start in range(0, len(xt), settings.mlp_batch_size):
                idx = order[start : start + settings.mlp_batch_size]
                loss = torch.nn.functional.mse_loss(net(xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                pv = net(xv).double().numpy()  # (N_v, E)
            if not np.isfinite(pv).all():
                raise ValueError(
                    f"baselines: the MLP diverged (weight_decay={wd}, epoch {epoch}): "
                    "non-finite predictions; lower mlp_lr"
                )
            score = _mean_pearson(pv, y_valid)
            if score > top[0]:
                top = (score, epoch, pv)
            elif epoch - top[1] >= settings.mlp_patience:
                break
        search.append({"weight_decay": float(wd), "epochs": top[1], "mean_pearson": top[0]})
        if best is None or top[0] > best[0]:
            best = (top[0], {"weight_decay": float(wd), "epochs": top[1]}, top[2])
    assert best is not None  # the grid is not empty (validated)
    return best[1], best[2], search


# --------------------------------------------------------------------------- the sweep


def run_baselines(
    store: FeatureStore,
    train: Labels,
    valid: Labels,
    settings: BaselineSettings | None = None,
    *,
    seeds: Sequence[int] = (0,),
) -> list[BaselineResult]:
    """Every model of ``settings`` on every feature set: ridge once (deterministic), the MLP
    once per seed. Labels must share their emotions; scores are on ``valid``."""
    settings = settings or BaselineSettings()
    if tuple(train.emotions) != tuple(valid.emotions):
        raise ValueError(
            f"baselines: {train.source} has emotions {list(train.emotions)} but {valid.source} "
            f"has {list(valid.emotions)}"
        )
    valid.check_scorable("validation")
    if len(train) < 2:
        raise ValueError(f"baselines: {train.source} has {len(train)} training clip(s)")
    seeds = list(seeds)
    if "mlp" in settings.models and not seeds:
        raise ValueError("baselines: the MLP needs at least one seed")
    pooled_train, pooled_valid = pool_store(store, train.ids), pool_store(store, valid.ids)
    std = Standardiser.fit(pooled_train)
    y_train = train.values.astype(np.float64)  # (N, E)
    y_valid = valid.values.astype(np.float64)  # (N_v, E)
    emotions = tuple(valid.emotions)
    results = []

    def add(model, features, seed, hyper, edge, n_features, pred, search) -> None:
        r = BaselineResult(
            name=f"{model}_{features}",
            model=model,
            features=features,
            seed=seed,
            hyper=hyper,
            at_grid_edge=bool(edge),
            n_features=int(n_features),
            valid=compute_metrics(pred, y_valid, emotions).to_dict(),
            search=search,
        )
        log.info(
            "baseline %s%s: valid mean Pearson %.4f (%s)",
            r.name,
            "" if seed is None else f" seed {seed}",
            r.valid["mean_pearson"],
            r.hyper_text,
        )
        results.append(r)

    for features in settings.feature_sets:
        x_train = std.matrix(pooled_train, features)  # (N, P)
        x_valid = std.matrix(pooled_valid, features)  # (N_v, P)
        if "ridge" in settings.models:
            alpha, pred, search = fit_ridge(x_train, y_train, x_valid, y_valid, settings.alphas)
            edge = alpha in (min(settings.alphas), max(settings.alphas))
            add("ridge", features, None, {"alpha": alpha}, edge, x_train.shape[1], pred, search)
        if "mlp" in settings.models:
            wds = settings.mlp_weight_decays
            for seed in seeds:
                hyper, pred, search = fit_mlp(x_train, y_train, x_valid, y_valid, settings, seed)
                edge = len(wds) > 1 and hyper["weight_decay"] in (min(wds), max(wds))
                add("mlp", features, seed, hyper, edge, x_train.shape[1], pred, search)
    return results


# --------------------------------------------------------------------------- outputs


def result_rows(results: Sequence[BaselineResult]) -> list[dict]:
    """One flat row per result: the CSV's columns."""
    rows = []
    for r in results:
        v = r.valid
        rows.append(
            {
                "name": r.name,
                "model": r.model,
                "features": r.features,
                "seed": "" if r.seed is None else r.seed,
                "hyperparameter": r.hyper_text,
                "at_grid_edge": r.at_grid_edge,
                "n_features": r.n_features,
                "mean_pearson": v["mean_pearson"],
                "mean_ccc": v["mean_ccc"],
                "mse": v["mse"],
                **{f"pearson_{e}": x for e, x in v["pearson"].items()},
                **{f"ccc_{e}": x for e, x in v["ccc"].items()},
            }
        )
    return rows


def summarise(results: Sequence[BaselineResult]) -> list[dict]:
    """Per baseline name: mean and std of the valid mean Pearson over its seeds (ridge:
    one value, std None), mean CCC, the chosen hyperparameters."""
    out = []
    for name in dict.fromkeys(r.name for r in results):
        rs = [r for r in results if r.name == name]
        vals = [r.valid["mean_pearson"] for r in rs]
        out.append(
            {
                "name": name,
                "model": rs[0].model,
                "features": rs[0].features,
                "n": len(rs),
                "deterministic": rs[0].seed is None,
                "mean": float(np.mean(vals)),
                "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                "mean_ccc": float(np.mean([r.valid["mean_ccc"] for r in rs])),
                "hyper": [r.hyper_text for r in rs],
            }
        )
    return out


def write_baselines(
    out: str | os.PathLike,
    results: Sequence[BaselineResult],
    settings: BaselineSettings,
    inputs: dict | None = None,
) -> Path:
    """``baselines.json`` (settings, summary, every result), ``baselines.csv`` (one row per
    result), ``baselines.png`` (bars of the valid mean Pearson, error bars over seeds) and
    ``settings.json`` (the resolved settings and ``inputs``: store, splits, seeds)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    resolved = {"settings": settings.to_dict(), **(inputs or {})}
    (out / SETTINGS_FILE).write_text(json.dumps(resolved, indent=2), encoding="utf-8")
    data = {
        "kind": "taemi baselines",
        **resolved,
        "summary": summarise(results),
        "results": [asdict(r) for r in results],
    }
    (out / RESULTS_JSON).write_text(json.dumps(data, indent=2), encoding="utf-8")
    rows = result_rows(results)
    with open(out / RESULTS_CSV, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot(out / PLOT_FILE, summarise(results))
    return out


def read_baselines(path: str | os.PathLike) -> dict:
    """A ``baselines.json`` (or the folder holding one); ValueError naming a file that is
    not one."""
    p = Path(path)
    f = p / RESULTS_JSON if p.is_dir() else p
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict) or data.get("kind") != "taemi baselines":
        raise ValueError(f"{f} is not a taemi baselines file (no kind 'taemi baselines')")
    if not isinstance(data.get("summary"), list):
        raise ValueError(f"{f} has no summary list")  # noqa: TRY004 (a bad file, as above)
    return data


def _plot(path: Path, summary: list[dict]) -> None:
    from taemi.train.plots import pyplot

    plt = pyplot()
    names = [s["name"] for s in summary]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 4))
    colours = ["C0" if s["model"] == "ridge" else "C1" for s in summary]
    ax.bar(
        range(len(names)),
        [s["mean"] for s in summary],
        yerr=[s["std"] or 0.0 for s in summary],
        capsize=4,
        color=colours,
    )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("valid mean Pearson")
    ax.set_title("simple baselines on pooled features (ridge C0, MLP C1)")
    ax.axhline(0.0, color="grey", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
