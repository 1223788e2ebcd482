"""The main job on embedded data: synthetic features -> train -> evaluate -> predict.

Until raw-media extraction lands, ``taemi demo`` is what the README's first command
runs: it needs no download and shows the whole chain on a laptop CPU, with the
result set against the oracle ceiling of the data generator.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from taemi.config import build_config
from taemi.data.labels import read_labels, write_predictions
from taemi.data.store import FeatureStore
from taemi.data.synth import SynthConfig, make_synth
from taemi.eval.metrics import compute_metrics
from taemi.eval.predict import predict_dataset
from taemi.model.checkpoint import load_run
from taemi.train.trainer import make_dataset, train

log = logging.getLogger(__name__)


def run_demo(
    out: str | Path,
    *,
    clips: int = 600,
    epochs: int = 6,
    preset: str = "paper",
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Run the whole chain into ``out``; return (and write ``out/summary.json``) the scores."""
    out = Path(out)
    synth = make_synth(out / "data", SynthConfig(clips=clips, seed=seed), progress=progress)
    store = FeatureStore(synth.store)
    cfg = build_config(
        preset,
        [
            ("model.audio_dim", store.dims["audio"]),
            ("model.vision_dim", store.dims["vision"]),
            ("model.text_dim", store.dims["text"]),
            ("train.max_epochs", epochs),
        ],
    )
    kw = dict(emotions=cfg.data.emotions, store_ids=store)
    train_labels = read_labels(synth.train_csv, **kw)
    valid_labels = read_labels(synth.valid_csv, **kw)
    run_dir = out / "run"
    if not (resume and (run_dir / "metrics.json").is_file()
            and json.loads((run_dir / "metrics.json").read_text()).get("finished")):  # fmt: skip
        train(cfg, store, train_labels, valid_labels, run_dir,
              resume=resume and (run_dir / "state.pt").is_file(), progress=progress)  # fmt: skip

    model, cfg = load_run(run_dir, "best")
    ds = make_dataset(cfg, store, valid_labels)
    pred, _ = predict_dataset(model, ds, batch_size=cfg.train.eval_batch_size, progress=progress)
    metrics = compute_metrics(pred, valid_labels.values, cfg.data.emotions)
    write_predictions(out / "valid_predictions_clipped.csv", valid_labels.ids, cfg.data.emotions, pred, clip=True)
    summary = {
        "preset": preset,
        "clips": {"train": len(train_labels), "valid": len(valid_labels)},
        "valid": metrics.to_dict(),
        "oracle_mean_pearson": synth.oracle["mean_pearson"],
        "oracle_mean_pearson_observable": synth.oracle["mean_pearson_observable"],
        "share_of_oracle": metrics.mean_pearson / synth.oracle["mean_pearson"],
        "run": str(run_dir),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
