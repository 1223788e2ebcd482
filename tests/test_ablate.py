"""taemi ablate: variants build the intended architectures, runs are reused, outputs are written."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import numpy as np
import pytest
from conftest import split_args

from taemi.cli.main import main
from taemi.config import build_config
from taemi.data.dataset import ClipDataset
from taemi.experiments.ablate import GRIDS, grid_variants
from taemi.store import FeatureStore
from taemi.train.modes import build_model

TINY = [
    "model.hidden=16",
    "model.heads=2",
    "model.sa_ffn=32",
    "model.head_hidden=16",
    "train.max_epochs=1",
    "train.batch_size=16",
]


def _params(variant) -> set[str]:
    cfg = build_config(
        variant.preset, [*variant.overrides, ("model.hidden", "16"), ("model.heads", "2")]
    )
    return {n for n, _ in build_model(cfg).named_parameters()}


def test_each_variant_builds_the_intended_architecture() -> None:
    v = {x.name: x for x in grid_variants("all")}
    full = _params(v["full"])
    assert {
        "enc_audio.self_attention.qkv.weight",
        "ca_audio.q_proj.weight",
        "missing.audio",
    } <= full
    concat = _params(v["simple_concat"])
    assert (
        not any("self_attention" in n or n.startswith("ca_") for n in concat)
        and "enc_audio.proj.weight" in concat
    )
    sa = _params(v["without_text_anchored_ca"])
    assert any("self_attention" in n for n in sa) and not any(n.startswith("ca_") for n in sa)
    assert not any(n.startswith("missing.") for n in _params(v["without_learned_tokens"]))
    assert build_config(v["without_modality_dropout"].preset).model.modality_dropout == 0.0
    assert {"ca_vision.q_proj.weight", "ca_text.q_proj.weight"} <= _params(v["anchor_audio"])
    assert {"ca_audio.q_proj.weight", "ca_text.q_proj.weight"} <= _params(v["anchor_vision"])
    for name in ("audio_only", "vision_only", "text_only", "audio_vision"):
        cfg = build_config(v[name].preset, list(v[name].overrides))
        assert set(cfg.data.modalities) < {"audio", "vision", "text"}
    assert [x.name for x in GRIDS["table4"]] == ["anchor_text", "anchor_audio", "anchor_vision"]
    with pytest.raises(ValueError, match="unknown grid"):
        grid_variants("table9")


def test_hidden_modalities_are_always_missing(store, labels) -> None:
    ds = ClipDataset(store, labels[0].ids, modalities=("audio",))
    items = [ds[i] for i in range(len(ds))]
    assert all(it.vision is None and it.text is None for it in items)
    assert any(it.audio is not None for it in items)


def test_ablate_runs_are_reused_and_outputs_written(synth, tmp_path, monkeypatch) -> None:
    out = tmp_path / "abl"
    argv = [
        "ablate",
        *split_args(synth, out),
        "--grid",
        "table4",
        "--seeds",
        "2",
        "--no-progress",
    ]
    for s in TINY:
        argv += ["--set", s]
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(argv) == 0
    assert "anchor_audio" in buf.getvalue() and "+-" in buf.getvalue()
    for name in (
        "results.csv",
        "summary.md",
        "summary.json",
        "ablation.png",
        "per_emotion_heatmap.png",
    ):
        assert (out / name).is_file(), name
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 2
    assert "0.39" in (out / "summary.md").read_text()  # the paper's value beside its row

    import taemi.experiments.ablate as ab

    def no_training(job):
        raise AssertionError(f"reran {job['run']}")

    monkeypatch.setattr(ab, "_run_one", no_training)
    with redirect_stdout(io.StringIO()):
        assert main(argv) == 0  # everything finished: nothing is trained again
    assert (out / "results.csv").read_text().splitlines() == rows


def test_store_fixture_has_all_modalities(store: FeatureStore) -> None:
    assert not np.asarray(store.missing).all(axis=0).any()


def test_identical_variants_share_their_runs(synth, tmp_path, monkeypatch) -> None:
    """In --grid all, anchor_text is the full model and all_concat is simple concat: trained once."""
    import taemi.experiments.ablate as ab

    trained: list[str] = []

    def fake_run(job):
        trained.append(job["run"])
        valid = {"mean_pearson": 0.5, "pearson": {"Joy": 0.5}}
        return ab._row(job, 1, valid)

    monkeypatch.setattr(ab, "_run_one", fake_run)
    monkeypatch.setattr(ab, "_write_outputs", lambda *a: None)
    rows = ab.ablate(
        synth.store, synth.train_csv, synth.valid_csv, tmp_path / "g", grid="all", seeds=2
    )
    names = {r["variant"] for r in rows}
    assert {"full", "anchor_text", "simple_concat", "all_concat"} <= names
    assert len(rows) == 2 * len(ab.grid_variants("all"))
    assert len(trained) == len(set(trained)) == 2 * (len(ab.grid_variants("all")) - 2)
    by = {(r["variant"], r["seed"]): r["run"] for r in rows}
    assert by[("anchor_text", 3407)] == by[("full", 3407)]
