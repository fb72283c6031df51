"""benchmarks/gpu_check.sh: its CPU plumbing run prints the one table, every row filled."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.slow
def test_gpu_check_cpu_parts_run_and_print_one_table():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPU_CHECK_BUDGET_S": "400"}
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu"], capture_output=True, text=True,
                          env=env, timeout=450)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| check | result | detail |"
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in table[2:]}
    assert set(rows) == {"train fp32 eager", "train fp32 compile", "train bf16 eager",
                         "train bf16 compile", "embed 3 ch official windows",
                         "resume 2 epochs, stopped at step 5", "bf16 vs fp32 loss, 6 steps"}
    assert rows["train fp32 eager"].endswith("fields/s")
    assert rows["embed 3 ch official windows"].endswith("fields/s")
    assert rows["resume 2 epochs, stopped at step 5"] == "bit-exact"  # on CPU it must be
    assert "FAILED" not in proc.stdout
