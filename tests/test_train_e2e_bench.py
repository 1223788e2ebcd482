"""``benchmarks/train_e2e.py`` (run on a GPU by ``benchmarks/gpu_check.sh``) must work: its CPU
smoke form trains two configurations end to end and prints the table and the JSON summary."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_e2e_benchmark_cpu_smoke(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    cmd = [
        sys.executable,
        "benchmarks/train_e2e.py",
        "--device",
        "cpu",
        "--train-clips",
        "48",
        "--valid-clips",
        "16",
        "--epochs",
        "2",
        "--preset",
        "official",
        "--variants",
        "default:",
        "fp32_eager:train.precision=fp32,train.cuda_graphs=off,data.resident=no",
        "--workdir",
        str(tmp_path / "work"),
        "--json",
        str(summary),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for name in ("default", "fp32_eager"):
        assert re.search(rf"^{name}\s+\d+\.\d+\s+\d+\.\d+", proc.stdout, flags=re.MULTILINE), out
    assert "against fp32_eager: default" in proc.stdout
    data = json.loads(summary.read_text())
    assert [v["name"] for v in data["variants"]] == ["default", "fp32_eager"]
    for v in data["variants"]:
        assert "error" not in v, v
        assert v["epochs_run"] == 2 and len(v["epoch_s_all"]) == 2
        assert v["startup_s"] >= 0 and v["epoch_s"] > 0 and v["samples_per_s"] > 0
        assert v["projected_50_epochs_s"] > v["total_s"] * 0.5
        assert v["final_valid_mean_pearson"] is not None
    assert data["variants"][1]["precision"] == "fp32"
