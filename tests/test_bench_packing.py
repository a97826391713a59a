"""``benchmarks/bench_packing.py`` runs on a CPU and times the packed and the padded step of the same sequences."""

import os
import re
import subprocess
import sys


def test_script_times_packed_and_padded_steps():
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_packing.py")
    args = ["--sequences", "5", "--shortest", "3", "--longest", "40", "--repeats", "1", "--threads", "1"]
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = int(re.search(r"\((\d+) tokens, padded to 5 x (\d+)", proc.stdout).group(1))
    groups = re.search(r"run as (\d+) groups of (.*) = (\d+) tokens with the padding", proc.stdout)
    sizes = [tuple(map(int, g.split(" x "))) for g in groups.group(2).split(" + ")]
    assert int(groups.group(1)) == len(sizes) and sum(n for n, _ in sizes) == 5
    assert tokens <= int(groups.group(3)) == sum(n * w for n, w in sizes)
    for name in ("padded", "packed"):
        assert float(re.search(rf"{name}: ([\d.]+) ms a step", proc.stdout).group(1)) > 0
    assert float(re.search(r"packed / padded speed: ([\d.]+)x", proc.stdout).group(1)) > 0
