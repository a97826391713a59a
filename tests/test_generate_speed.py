"""``benchmarks/generate_speed.py``: Hugging Face ``generate``'s decoding rate, eager and with a static cache (the full
run compiles two models: marked slow)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from bmojo import BMojoConfig, BMojoForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from generate_speed import generate_seconds  # noqa: E402


def test_generate_seconds_runs_a_warm_up_and_the_repeats_each_to_the_full_length():
    """``repeats + 1`` generations (one not timed), each of exactly ``new_tokens`` (no early stop): a forward for
    the prompt and one for every new token but the last."""
    model = BMojoForCausalLM(BMojoConfig.from_preset("bmojo", "tiny", num_hidden_layers=1)).eval()
    calls = []
    forward = model.forward
    model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    seconds = generate_seconds(model, torch.randint(0, 100, (1, 12)), 5, 2)
    assert seconds > 0 and len(calls) == 3 * 5


@pytest.mark.slow
def test_script_reports_both_ways_for_both_models():
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "generate_speed.py")
    proc = subprocess.run([sys.executable, script, "--length", "40", "--new-tokens", "6", "--repeats", "1", "--set",
                           "num_hidden_layers=1", "--set", "window_size=16"], capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split()[0] for line in proc.stdout.splitlines() if re.search(r"eager +[\d.]+ tokens/s +static", line)]
    assert rows == ["transformer", "bmojo"]
