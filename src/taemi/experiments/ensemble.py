"""Ensembles of trained runs: a weighted mean of their raw predictions.

Members can be any mix of presets, training modes (frozen / finetune) and seeds, as long
as they predict the same emotions in the same order (checked from their configs before
any weights load; the error names the runs). Every prediction comes from the one
inference path, :class:`taemi.inference.Predictor` (from media:
:func:`taemi.predict_media.predict_media`, which uses it too).

Weights:

- ``equal``: 1/M each;
- ``fit``: non-negative weights summing to 1 that maximise the mean Pearson r (the
  challenge score) of the weighted mean on a labelled split. Projected gradient ascent on
  the simplex (numpy; sort-based Euclidean projection, Duchi et al., ICML 2008) with a
  step size that halves on a failed step and grows on a successful one, starting from
  the best member alone (a vertex of the simplex), and taking only steps that raise the
  score: the fitted ensemble scores at least the best member on the split it was fitted
  on. Pearson r ignores the scale of the predictions; the sum-to-1 constraint keeps them
  on the members' scale, so CCC and MSE stay meaningful.

Predictions are averaged raw (not clipped); the submission is clipped to [0, 1] when it
is written (:func:`taemi.eval.submission.write_submission`), as ``taemi predict`` does.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from taemi.data.labels import Labels, read_ids, read_labels
from taemi.eval.metrics import compute_metrics
from taemi.run import load_features_record, read_config, weights_file

log = logging.getLogger(__name__)

#: Files written into the output folder.
SUBMISSION_FILE = "predictions.csv"
ENSEMBLE_FILE = "ensemble.json"
WEIGHTINGS = ("equal", "fit")


@dataclass(frozen=True)
class Member:
    """One run of the ensemble, as its config describes it."""

    run: str  # the run folder as given
    which: str  # best | last
    weights_file: str  # the safetensors file its predictions come from
    preset: str  # the preset its config started from
    mode: str  # frozen | finetune
    seed: int  # train.seed
    emotions: tuple[str, ...]  # what it predicts, in column order


def describe_members(runs: Sequence[str | os.PathLike], which: str = "best") -> list[Member]:
    """Each run's config (no weights loaded); ValueError for fewer than 2 runs, a run
    given twice, a missing weights file, or runs that predict different emotions."""
    if len(runs) < 2:
        raise ValueError(
            f"ensemble: needs at least 2 runs, got {len(runs)}: {list(map(str, runs))}"
        )
    resolved = [str(Path(r).resolve()) for r in runs]
    twice = sorted({str(r) for r, k in zip(runs, resolved) if resolved.count(k) > 1})
    if twice:
        raise ValueError(f"ensemble: run(s) given more than once: {twice}")
    members = []
    for run in runs:
        cfg = read_config(run)
        wf = weights_file(run, which)
        if not wf.is_file():
            raise FileNotFoundError(f"ensemble: {run} has no {wf.name} (--which {which})")
        members.append(
            Member(
                str(run), which, str(wf), cfg.preset, cfg.mode, cfg.train.seed, cfg.data.emotions
            )
        )
    first = members[0]
    other = [m for m in members if m.emotions != first.emotions]
    if other:
        listed = "; ".join(f"{m.run}: {list(m.emotions)}" for m in [first, *other])
        raise ValueError(
            "ensemble: the runs predict different emotions (names or order), so their "
            f"predictions cannot be averaged: {listed}"
        )
    return members


# --------------------------------------------------------------------------- weights


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of (M,) ``v`` onto {w >= 0, sum w = 1} (Duchi et al., 2008)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.arange(1, len(v) + 1)
    rho = np.nonzero(u - css / k > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1), 0.0)


def combine(preds: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, E) float64 weighted mean of (M, N, E) member predictions with (M,) weights."""
    return np.tensordot(np.asarray(weights, dtype=np.float64), preds.astype(np.float64), axes=1)


def _score_and_grad(
    w: np.ndarray, centred: np.ndarray, t: np.ndarray, t_norm: np.ndarray
) -> tuple[float, np.ndarray]:
    """Mean over emotions of Pearson r of ``sum_m w_m P_m`` and its gradient in w.

    ``centred``: (M, N, E) member predictions minus their column means; ``t``: (N, E)
    centred targets; ``t_norm``: (E,) their norms (> 0)."""
    p = np.tensordot(w, centred, axes=1)  # (N, E)
    p_norm = np.linalg.norm(p, axis=0)  # (E,)
    ok = p_norm > 0
    safe = np.where(ok, p_norm, 1.0)
    r = np.where(ok, (p * t).sum(axis=0) / (safe * t_norm), 0.0)  # (E,)
    dr_dp = np.where(ok, t / (safe * t_norm) - r * p / safe**2, 0.0)  # (N, E)
    grad = np.einsum("mne,ne->m", centred, dr_dp) / t.shape[1]  # (M,)
    return float(r.mean()), grad


def fit_weights(
    preds: np.ndarray, target: np.ndarray, *, max_iter: int = 2000, tol: float = 1e-10
) -> tuple[np.ndarray, dict]:
    """Non-negative weights summing to 1 that maximise the mean Pearson r of the weighted
    mean of ``preds`` (M, N, E) against ``target`` (N, E); (weights (M,), a record of the
    fit: start member, iterations, start and final score). See the module docstring."""
    preds = np.asarray(preds, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    t = t - t.mean(axis=0)  # (N, E)
    t_norm = np.linalg.norm(t, axis=0)  # (E,)
    if (t_norm == 0).any():
        raise ValueError("ensemble fit: a target column is constant, Pearson r is undefined")
    centred = preds - preds.mean(axis=1, keepdims=True)  # (M, N, E)
    m = preds.shape[0]
    vertex_scores = [_score_and_grad(np.eye(m)[i], centred, t, t_norm)[0] for i in range(m)]
    start = int(np.argmax(vertex_scores))
    w = np.eye(m)[start]
    score, grad = _score_and_grad(w, centred, t, t_norm)
    step, it = 1.0, 0
    for it in range(1, max_iter + 1):
        cand = project_simplex(w + step * grad)
        cand_score, cand_grad = _score_and_grad(cand, centred, t, t_norm)
        if cand_score > score + tol:
            w, score, grad = cand, cand_score, cand_grad
            step = min(step * 2.0, 1e6)
        else:
            step /= 2.0
            if step < 1e-12:
                break
    return w, {
        "objective": "mean Pearson r",
        "start_member": start,
        "start_score": vertex_scores[start],
        "score": score,
        "iterations": it,
    }


# --------------------------------------------------------------------------- predicting


def member_predictions(
    members: Sequence[Member],
    store,
    id_lists: dict[str, list[str]],
    *,
    device: str = "cpu",
    precision: str = "fp32",
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Per named id list, the members' raw predictions (M, N, E) float32 from ``store``;
    each member is loaded once (:class:`taemi.inference.Predictor`) and released."""
    from taemi.inference import Predictor
    from taemi.runtime import resolve_device, resolve_precision

    torch_device = resolve_device(device)
    prec = resolve_precision(precision, torch_device)
    out: dict[str, list[np.ndarray]] = {name: [] for name in id_lists}
    for member in members:
        predictor = Predictor.from_run(member.run, member.which).on(torch_device, prec)
        predictor.check_store(store)
        for name, ids in id_lists.items():
            pred = predictor.predict(
                predictor.dataset(store, ids=ids),
                progress=progress,
                desc=f"{Path(member.run).name} {name}",
                check=f"ensemble member {member.run} on {store.root}",
            )
            out[name].append(pred)
        del predictor
    return {name: np.stack(p) for name, p in out.items()}  # (M, N, E)


def extraction_key(run: str) -> dict:
    """What decides a run's features from media: profile, options, face crops, every
    model (backbones, speech recogniser), face detection stride, image precision, dims.
    ValueError (from :func:`taemi.predict_media.extraction_plan`) when the run's features
    cannot be extracted from media at all."""
    from taemi import MODALITIES
    from taemi.predict_media import extraction_plan, face_detect_every, image_precision

    features = load_features_record(run)
    profile, opts, face = extraction_plan(features, None, run=run)
    mods = features["modalities"]  # extraction_plan refused a run without it
    return {
        "profile": profile,
        "options": asdict(opts),
        "face": face,
        "backbones": {m: mods[m].get("backbone") for m in MODALITIES},
        "asr": mods["text"]["settings"].get("asr"),
        "face_detect_every": face_detect_every(mods["vision"]["settings"]),
        "image_precision": image_precision(mods["vision"]["settings"]),
        "dims": features["dims"],
    }


def check_same_extraction(members: Sequence[Member]) -> dict:
    """The members' common extraction (:func:`extraction_key`); ValueError naming the runs
    and the settings where they differ."""
    keys = [extraction_key(m.run) for m in members]
    first = keys[0]
    diffs = []
    for m, k in zip(members[1:], keys[1:]):
        for name in first:
            if k[name] != first[name]:
                diffs.append(f"{name}: {first[name]!r} ({members[0].run}) vs {k[name]!r} ({m.run})")
    if diffs:
        raise ValueError(
            "ensemble from media: the runs' features.json describe different extractions, so "
            "one set of features cannot serve them all; " + "; ".join(diffs)
        )
    return first


def media_member_predictions(
    members: Sequence[Member],
    media: Sequence[str | os.PathLike],
    *,
    features_dir: str | os.PathLike | None = None,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 8,
    workers: int = 2,
    progress: bool = False,
) -> tuple[list[str], np.ndarray, list[dict], dict]:
    """(clip ids, raw predictions (M, N, E), failures, the common extraction) of media
    files: the members must share one extraction (:func:`check_same_extraction`); the
    features are extracted once, into ``features_dir`` or a temporary folder, and every
    member predicts from them (:func:`taemi.predict_media.predict_media` reuses clips
    already in the folder by id)."""
    from taemi.predict_media import predict_media
    from taemi.train.modes import mode_for

    common = check_same_extraction(members)
    # a member that reads raw waveforms (fine-tuning) extracts first, so they are cached
    order = sorted(
        range(len(members)),
        key=lambda i: not mode_for(read_config(members[i].run)).reads_waveforms,
    )
    with tempfile.TemporaryDirectory(prefix="taemi-ensemble-") as tmp:
        root = Path(features_dir) if features_dir is not None else Path(tmp) / "features"
        results: dict[int, object] = {}
        for i in order:
            m = members[i]
            results[i] = predict_media(
                m.run,
                media,
                which=m.which,
                features_dir=root,
                device=device,
                precision=precision,
                batch_size=batch_size,
                workers=workers,
                clip=False,
                progress=progress,
            )
    ids = [c.clip_id for c in results[0].clips]
    for i in range(1, len(members)):
        other = [c.clip_id for c in results[i].clips]
        if other != ids:
            raise ValueError(
                f"ensemble from media: {members[i].run} predicted clips {other[:5]} but "
                f"{members[0].run} predicted {ids[:5]} from the same features"
            )
    preds = np.stack([results[i].values() for i in range(len(members))])  # (M, N, E)
    return ids, preds, list(results[0].failures), common


# --------------------------------------------------------------------------- the command's work


def ensemble(
    runs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    store: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    weighting: str = "equal",
    fit_on: str | os.PathLike | None = None,
    ids: str | os.PathLike | None = None,
    media: Sequence[str | os.PathLike] = (),
    which: str = "best",
    device: str = "cpu",
    precision: str = "fp32",
    clip: bool = True,
    batch_size: int = 8,
    workers: int = 2,
    progress: bool = False,
) -> dict:
    """Combine ``runs``; write ``out/predictions.csv`` (ABAW submission) and
    ``out/ensemble.json``; return the JSON record.

    ``store``: the features of ``labels`` (scored: each member and the ensemble),
    ``fit_on`` (the split the weights are fitted on with ``weighting="fit"``; default
    ``labels``) and of the submission (``ids``, default every clip of the store) unless
    ``media`` is given: then the submission covers the media files (their features
    extracted once, :func:`media_member_predictions`)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"ensemble: --weights {weighting!r}: expected one of {WEIGHTINGS}")
    members = describe_members(runs, which)
    emotions = members[0].emotions
    fit_file = fit_on if fit_on is not None else labels
    if weighting == "fit" and fit_file is None:
        raise ValueError(
            "ensemble: --weights fit needs labelled clips: --fit-on CSV or --labels CSV"
        )
    if (labels is not None or fit_on is not None or ids is not None) and store is None:
        raise ValueError("ensemble: --labels, --fit-on and --ids need --store (their features)")
    if not media and store is None:
        raise ValueError("ensemble: needs --store (features) or media files to predict")
    if media and ids is not None:
        raise ValueError(
            "ensemble: --ids selects store clips; with media files the media are predicted"
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"ensemble: --out {out} is a file; give a folder")

    fs = None
    id_lists: dict[str, list[str]] = {}
    split_labels: dict[str, Labels] = {}
    if store is not None:
        from taemi.store import FeatureStore

        fs = FeatureStore(store)
        kw = {"emotions": emotions, "store_ids": fs}
        if labels is not None:
            split_labels["labels"] = read_labels(labels, **kw).check_scorable("scoring")
        if weighting == "fit":
            split_labels["fit"] = read_labels(fit_file, **kw).check_scorable("fitting")
        for name, lab in split_labels.items():
            id_lists[name] = list(lab.ids)
        if not media:
            id_lists["submission"] = (
                read_ids(ids, what="--ids file", allow_empty=False) if ids else list(fs.ids)
            )
            missing = [i for i in id_lists["submission"] if i not in fs]
            if missing:
                raise ValueError(
                    f"ensemble: {len(missing)} id(s) of {ids} are not in {store}: {missing[:5]}"
                )
    preds = (
        member_predictions(
            members, fs, id_lists, device=device, precision=precision, progress=progress
        )
        if id_lists
        else {}
    )

    record: dict = {
        "members": [{k: v for k, v in asdict(m).items() if k != "emotions"} for m in members],
        "emotions": list(emotions),
        "weighting": weighting,
    }
    if weighting == "fit":
        w, fit = fit_weights(preds["fit"], split_labels["fit"].values)
        record["fit"] = {"labels": str(fit_file), "n": len(split_labels["fit"]), **fit}
        if fit_on is None or (labels is not None and Path(fit_on) == Path(labels)):
            record["fit"]["note"] = "fitted on the scored split: its scores are in-sample"
    else:
        w = np.full(len(members), 1.0 / len(members))
    record["weights"] = [float(x) for x in w]
    if "labels" in split_labels:
        target = split_labels["labels"].values
        p = preds["labels"]
        record["scores"] = {
            "labels": str(labels),
            "predictions": "raw (not clipped)",
            "ensemble": compute_metrics(combine(p, w), target, emotions).to_dict(),
            "members": [
                {"run": m.run, **compute_metrics(p[i], target, emotions).to_dict()}
                for i, m in enumerate(members)
            ],
        }

    if media:
        sub_ids, sub_preds, failures, extraction = media_member_predictions(
            members,
            media,
            device=device,
            precision=precision,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
        )
        record["extraction"] = extraction
        record["failures"] = failures
        source = "media"
    else:
        sub_ids, sub_preds, source = id_lists["submission"], preds["submission"], "store"
    values = combine(sub_preds, w) if len(sub_ids) else np.zeros((0, len(emotions)))
    from taemi.eval.submission import write_submission

    out.mkdir(parents=True, exist_ok=True)
    sub_path = out / SUBMISSION_FILE
    write_submission(sub_path, sub_ids, emotions, values, clip=clip)
    record["submission"] = {
        "path": str(sub_path),
        "source": str(store) if source == "store" else [str(x) for x in media],
        "clips": len(sub_ids),
        "clipped": clip,
    }
    tmp = out / f".{ENSEMBLE_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, out / ENSEMBLE_FILE)
    log.info(
        "ensemble of %d runs (%s weights %s): %s",
        len(members),
        weighting,
        record["weights"],
        sub_path,
    )
    return record
