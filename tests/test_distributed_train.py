"""Distributed data parallel training on CPU (gloo), 2 processes.

- ``torchrun --nproc-per-node 2 -m taemi train`` reaches the validation metrics and
  weights of one process with the same global batch, and writes the run folder once;
- an interrupted 2-process run resumes to exactly the uninterrupted run (every rank's
  RNG state is saved), with dropout and modality dropout on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import NO_DROPOUT, TINY_OVERRIDES, split_args, tiny_cli_sets
from safetensors.torch import load_file

from taemi.config import build_config, parse_overrides
from taemi.run import STATE_FILE
from taemi.train.trainer import train

HERE = Path(__file__).parent
NO_RANDOMNESS = list(NO_DROPOUT)
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def test_torchrun_two_processes_match_one(tmp_path, synth, store, labels) -> None:
    sets = [*NO_RANDOMNESS, "train.batch_size=16", "train.max_epochs=2", "train.patience=0"]
    one = train(
        build_config("paper", parse_overrides([*TINY_OVERRIDES, *sets])),
        store,
        *labels,
        tmp_path / "one",
        progress=False,
    )
    run = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "taemi",
        "train",
        *split_args(synth, run),
        "--no-progress",
        *tiny_cli_sets(),
        *[a for s in sets for a in ("--set", s)],
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=child_env(), timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1  # rank 0 reports, once

    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (tmp_path / "one", run))
    assert m2["processes"] == 2 and m1["processes"] == 1
    assert m2["valid"]["mean_pearson"] == pytest.approx(m1["valid"]["mean_pearson"], abs=1e-3)
    for e, r in m1["valid"]["pearson"].items():
        assert m2["valid"]["pearson"][e] == pytest.approx(r, abs=2e-3)
    assert max_weight_diff(one.run_dir / "last.safetensors", run / "last.safetensors") < 5e-4
    # one run folder, written once: the single-process file set, no per-rank copies
    assert sorted(p.name for p in run.iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    st = torch.load(run / STATE_FILE, weights_only=True)
    assert st["world_size"] == 2 and len(st["rng_ranks"]) == 2


def _launch(
    synth, out: Path, overrides: list[str], *extra: str
) -> list[subprocess.CompletedProcess]:
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {
            **child_env(),
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        cmd = [
            sys.executable,
            str(HERE / "_ddp_child.py"),
            str(synth.store),
            str(synth.train_csv),
            str(synth.valid_csv),
            str(out),
            json.dumps(overrides),
            *extra,
        ]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    done = []
    for p in procs:
        out_, err = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out_, err))
    return done


def test_distributed_run_resumes_exactly(tmp_path, synth) -> None:
    overrides = [*TINY_OVERRIDES, "train.batch_size=16", "train.max_epochs=3", "train.patience=0"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    ok = _launch(synth, full, overrides)
    assert all(p.returncode == 0 for p in ok), [p.stderr[-2000:] for p in ok]
    first = _launch(synth, cut, overrides, "--interrupt-after", "1")
    assert [p.returncode for p in first] == [130, 130], [p.stderr[-2000:] for p in first]
    assert len((cut / "history.csv").read_text().splitlines()) == 2  # header + epoch 1
    second = _launch(synth, cut, overrides, "--resume")
    assert all(p.returncode == 0 for p in second), [p.stderr[-2000:] for p in second]

    def rows(run: Path) -> list[list[str]]:  # history without the wall-clock column
        return [line.split(",")[:-1] for line in (run / "history.csv").read_text().splitlines()]

    assert rows(full) == rows(cut)
    assert max_weight_diff(full / "last.safetensors", cut / "last.safetensors") == 0.0


def test_fine_tuning_runs_on_two_processes(tmp_path) -> None:
    """DDP over backbones + fusion (unused-parameter detection on: a batch without audio
    skips the audio backbone), with length-bucketed batches."""
    pytest.importorskip("transformers")
    from finetune_helpers import make_bert_dir, make_finetune_store, make_w2v_dir

    store, train_csv, valid_csv = make_finetune_store(tmp_path, n=24)
    w2v = make_w2v_dir(tmp_path / "w2v", conv_kernel=(32, 10), conv_stride=(16, 10))
    bert = make_bert_dir(tmp_path / "bert")
    overrides = [
        "mode=finetune",
        f"finetune.audio_backbone={w2v}",
        f"finetune.text_backbone={bert}",
        "finetune.max_audio_seconds=2.0",
        "model.vision_dim=6",
        "model.hidden=16",
        "model.heads=2",
        "model.sa_ffn=32",
        "model.head_hidden=16",
        "train.batch_size=8",
        "train.max_epochs=1",
        "train.patience=0",
        "train.precision=fp32",
        "data.batching=bucket",
    ]

    data = SimpleNamespace(
        store=store, train_csv=train_csv, valid_csv=valid_csv
    )  # what _launch reads
    run = tmp_path / "run"
    done = _launch(data, run, overrides)
    assert all(p.returncode == 0 for p in done), [p.stderr[-2000:] for p in done]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["finished"]
    assert (run / "backbones" / "audio").is_dir()
