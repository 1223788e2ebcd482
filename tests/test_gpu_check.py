"""The prepared GPU check (``benchmarks/gpu_check.sh``) must run, so that a session lent a
GPU spends its few minutes measuring, not debugging. Here it runs its CPU smoke form (the
invocation in its header): every step on the CPU with tiny sizes, the same commands and
options as on a GPU except the device and the precision."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {
    "DEVICE": "cpu",
    "PRECISION": "bf16",
    "STEPS": "1",
    "WARMUP": "1",
    "PRESETS": "official",
    "BIG_BATCH": "4",
    "COMPILED_BATCHES": "4",
    "OVERHEAD_BATCH": "4",
    "OVERHEAD_ROUNDS": "1",
    "E2E_TRAIN": "48",
    "E2E_VALID": "16",
    "E2E_EPOCHS": "2",
    "E2E_PRESET": "official",
    "CLIPS": "120",
    "EPOCHS": "1",
    "FT_BATCH": "2",
    "FT_STEPS": "1",
    "FT_ARGS": "--skip-paper",
    "ENC_SIZE": "tiny",
    "ENC_ITEMS": "4",
    "ENC_CPU_ITEMS": "2",
    "DEMO_CLIPS": "24",
    "DEMO_EPOCHS": "2",
}


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout"
)
def test_gpu_check_script_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {
        **os.environ,
        **SMOKE,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "TMPDIR": str(tmp_path),
    }
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = dict(
        re.findall(r"^(\w+) rc=(\d+)", (out / "steps.txt").read_text(), flags=re.MULTILINE)
    )
    assert steps == {
        "throughput": "0",
        "throughput256": "0",
        "compiled4": "0",
        "overhead": "0",
        "e2e": "0",
        "synth": "0",
        "train": "0",
        "finetune": "0",
        "encoders": "0",
        "demo": "0",
    }, (out / "steps.txt").read_text() + proc.stdout[-3000:]

    throughput = (out / "throughput.txt").read_text()
    assert "exec util" in throughput and "[official] summary" in throughput
    # the analytic FLOP counts (both forms of the cross-attention) agree with FlopCounterMode
    ratios = [float(x) for x in re.findall(r"analytic(?: useful)? ([0-9.]+)x", throughput)]
    assert len(ratios) == 4 and all(0.99 <= r <= 1.01 for r in ratios), ratios
    for runner in (
        "plain",
        "eager",
        "bf16",
        "bf16_precast",
        "graphed_bf16",
        "graphed_bf16_each_use",
        "graphed_fp32",
    ):
        assert re.search(rf"^{runner}\s+\d", throughput, flags=re.MULTILINE), runner
    big = (out / "throughput256.txt").read_text()
    for runner in ("graphed_bf16", "graphed_bf16_each_use", "bf16_precast"):
        assert re.search(rf"^{runner}\s+\d", big, re.MULTILINE), runner
    compiled = (out / "compiled4.txt").read_text()
    assert re.search(r"^graphed_bf16_compiled\s+\d", compiled, re.MULTILINE), compiled[-2000:]
    assert "'compiled': True" in compiled and "graphed_bf16_compiled vs graphed_bf16" in compiled
    # operations per step of every engine: the captured bf16 step dispatches fewer than the
    # same step with autocast casting at each use, and casts fewer
    overhead = (out / "overhead.txt").read_text()
    rows = {
        name: (int(ops), int(casts))
        for name, ops, casts in re.findall(
            r"^  (\w+)\s+(\d+)\s+(\d+)\s+\d+\s+[0-9.]+ ", overhead, re.MULTILINE
        )
    }
    assert set(rows) >= {"fp32", "bf16", "bf16_each_use", "graphed_bf16", "graphed_fp32"}, rows
    assert rows["graphed_bf16"][0] < rows["graphed_bf16_each_use"][0]
    assert rows["graphed_bf16"][1] < rows["graphed_bf16_each_use"][1]
    assert rows["bf16"][0] < rows["bf16_each_use"][0] and rows["fp32"][1] == 0
    # each runner profiled after its timing (on the CPU: operators by self CPU time)
    for text, runner in ((throughput, "graphed_bf16"), (big, "bf16"), (big, "graphed_bf16")):
        section = re.search(
            rf"profile {runner}: .*top operators by self CPU time:\n((?:    .*\n)+)", text
        )
        assert section, runner
        shares = [float(x) for x in re.findall(r"^\s+([0-9.]+)%", section.group(1), re.MULTILINE)]
        assert shares and all(0 < x <= 100 for x in shares) and sum(shares) <= 100.5, shares
    e2e = json.loads((out / "e2e_bench.json").read_text())
    assert "default" in json.dumps(e2e) and "fp32_eager" in json.dumps(e2e)
    assert '"mean_pearson"' in (out / "metrics.json").read_text()
    assert (out / "demo_summary.json").is_file() and (out / "demo_extract_summary.json").is_file()
    assert "finetune_offline" in (out / "finetune.txt").read_text()
    encoders = json.loads((out / "encoders.json").read_text())
    names = [r["encoder"] for r in encoders]
    assert any("wav2vec2" in n for n in names) and any("ViT-B/16" in n for n in names)
    assert all(r.get("cpu_fp32_ms", 0) > 0 for r in encoders if "skipped" not in r)
