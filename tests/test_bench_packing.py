"""``benchmarks/bench_packing.py`` runs on a CPU and times the step of one batch, padded rows and packed rows."""

import os
import re
import subprocess
import sys


def test_script_times_the_three_steps():
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_packing.py")
    args = ["--sequences", "5", "--shortest", "3", "--longest", "40", "--repeats", "1", "--threads", "1"]
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = int(re.search(r"\((\d+) tokens, padded to 5 x (\d+)", proc.stdout).group(1))
    groups = re.search(r"groups: (.*) = (\d+) tokens with the padding", proc.stdout)
    sizes = [tuple(map(int, g.split(" x "))) for g in groups.group(1).split(" + ")]
    assert sum(n for n, _ in sizes) == 5 and tokens <= int(groups.group(2)) == sum(n * w for n, w in sizes)
    for name in ("one batch", "padded", "packed"):
        ms, ratio = re.search(rf"  {name}: ([\d.]+) ms a step, [\d,]+ tokens/s, ([\d.]+)x", proc.stdout).groups()
        assert float(ms) > 0 and float(ratio) > 0
