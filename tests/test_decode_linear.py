"""``benchmarks/decode_linear.py`` runs on a CPU and times both models' decoding steps with each product."""

from __future__ import annotations

import os
import subprocess
import sys


def test_script_times_both_models_with_each_product():
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "decode_linear.py")
    args = ["--size", "tiny", "--length", "24", "--steps", "2", "--pairs", "1", "--set", "window_size=8"]
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False,
                          env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("│")[1:-1] for line in proc.stdout.splitlines() if line.startswith("│")]
    assert [row[0].strip() for row in rows] == ["bmojo", "transformer"]
    for row in rows:
        times = [float(cell) for cell in row[1:5]]  # the products alone, then the steps, with each product
        assert all(t > 0 for t in times) and row[5].strip().endswith("x") and float(row[5].strip()[:-1]) > 0


def test_script_times_single_products_split_and_not():
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "decode_linear.py")
    args = ["--shapes", "64x32,96X16", "--megabytes", "0.05"]
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False,
                          env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [
        [cell.strip() for cell in line.split("│")[1:-1]] for line in proc.stdout.splitlines() if line.startswith("│")
    ]
    assert [row[0] for row in rows] == ["64 x 32", "96 x 16"]
    for row in rows:
        assert int(row[1]) >= 2 and float(row[2]) > 0 and float(row[3]) > 0 and row[4].endswith("x")
