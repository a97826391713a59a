"""The lm-evaluation-harness adapter on local tasks (a jsonl file and YAML configs written here; no downloads)."""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bmojo import BMojoConfig, BMojoForCausalLM
from bmojo.data import ByteTokenizer

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'bmojo[eval]')")
import bmojo.lm_eval  # noqa: F401  (registers the model class "bmojo")

DOCS = [
    {"query": "The cat sat on the", "choices": ["mat", "moon", "idea"], "label": 0, "text": "To be, or not to be."},
    {"query": "One, two,", "choices": ["three", "blue"], "label": 0, "text": "All the world's a stage."},
    {"query": "Hello", "choices": ["world", "there", "you"], "label": 2, "text": "Brevity is the soul of wit."},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny byte-level model, and a task folder with choice, rolling and generation tasks over one file."""
    root = tmp_path_factory.mktemp("lm_eval")
    torch.manual_seed(0)
    model = BMojoForCausalLM(BMojoConfig.from_preset("bmojo", "tiny", vocab_size=257, window_size=4, eidetic_size=2))
    model.eval().save_pretrained(root / "model")
    ByteTokenizer().save(root / "model")
    data = root / "tasks" / "docs.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    tasks = {
        "bmojo_choice": """
            output_type: multiple_choice
            doc_to_text: query
            doc_to_choice: choices
            doc_to_target: label
            metric_list:
              - metric: acc
        """,
        "bmojo_rolling": """
            output_type: loglikelihood_rolling
            doc_to_text: ""
            doc_to_target: text
            metric_list:
              - metric: bits_per_byte
        """,
        "bmojo_generate": """
            output_type: generate_until
            doc_to_text: query
            doc_to_target: " "
            generation_kwargs:
              until: ["."]
              max_gen_toks: 6
              do_sample: false
            metric_list:
              - metric: exact_match
        """,
    }
    for name, body in tasks.items():
        (root / "tasks" / f"{name}.yaml").write_text(f"task: {name}\n{common}{textwrap.dedent(body)}")
    return root, model


def _loglik(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Direct sum of log p(continuation | context) and whether each continuation token is the argmax."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = F.log_softmax(model(ids[:, :-1], use_cache=False).logits[0], -1)[-len(continuation) :]
    target = torch.tensor(continuation)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


def _greedy_text(model, ids: list[int], steps: int) -> str:
    ids = list(ids)
    start = len(ids)
    for _ in range(steps):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
        if ids[-1] == 256:
            break
    return ByteTokenizer().decode(ids[start:])


def test_harness_scores_match_direct_computation(setup):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    root, model = setup
    results = simple_evaluate(
        model="bmojo", model_args=f"pretrained={root / 'model'},max_length=64", batch_size=2, log_samples=True,
        tasks=["bmojo_choice", "bmojo_rolling", "bmojo_generate"],
        task_manager=TaskManager(include_path=str(root / "tasks"), include_defaults=False),
    )  # fmt: skip
    enc = ByteTokenizer().encode
    correct = []
    for sample in sorted(results["samples"]["bmojo_choice"], key=lambda s: s["doc_id"]):
        doc = DOCS[sample["doc_id"]]
        want = [_loglik(model, enc(doc["query"]), enc(" " + c)) for c in doc["choices"]]
        got = [tuple(r[0]) for r in sample["resps"]]
        assert np.allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5)
        assert [g[1] for g in got] == [w[1] for w in want]
        correct.append(int(np.argmax([w[0] for w in want])) == doc["label"])
    assert results["results"]["bmojo_choice"]["acc,none"] == pytest.approx(np.mean(correct))

    nll = sum(-_loglik(model, [256], enc(d["text"]))[0] for d in DOCS)
    nbytes = sum(len(d["text"].encode()) for d in DOCS)
    bpb = results["results"]["bmojo_rolling"]["bits_per_byte,none"]
    assert bpb == pytest.approx(nll / nbytes / math.log(2), rel=1e-5)

    for sample in results["samples"]["bmojo_generate"]:
        doc = DOCS[sample["doc_id"]]
        assert sample["resps"][0][0] == _greedy_text(model, [256, *enc(doc["query"])], 6).split(".")[0]


@pytest.mark.slow  # a fresh interpreter importing lm_eval and datasets: about 25 s on 2 CPU cores
def test_lm_eval_command_finds_the_model(setup):
    root, _ = setup
    out = root / "cli_out"
    cmd = [sys.executable, "-m", "bmojo.lm_eval", "--model", "bmojo", "--model_args", f"pretrained={root / 'model'}",
           "--tasks", "bmojo_choice", "--include_path", str(root / "tasks"), "--output_path", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bmojo_choice" in proc.stdout and "acc" in proc.stdout


GPT2_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2_tokenizer"


@pytest.mark.slow  # a fresh interpreter importing lm_eval and datasets: about 30 s on 2 CPU cores
@pytest.mark.skipif(not GPT2_TOKENIZER.is_dir(), reason="needs ../shared/data/gpt2_tokenizer")
def test_plain_lm_eval_hf_model_loads_a_saved_bmojo_model(setup, tmp_path):
    """``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`` (no bmojo import) scores a saved
    model with a Hugging Face tokenizer exactly as the ``bmojo`` adapter does."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    root, _ = setup
    torch.manual_seed(0)
    model = BMojoForCausalLM(BMojoConfig.from_preset("bmojo", "tiny", vocab_size=50257, window_size=4, eidetic_size=2))
    model.eval().save_pretrained(tmp_path / "model")
    for f in GPT2_TOKENIZER.iterdir():
        shutil.copy(f, tmp_path / "model" / f.name)
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={tmp_path / 'model'},trust_remote_code=True,dtype=float32", "--device", "cpu",
           "--tasks", "bmojo_choice", "--include_path", str(root / "tasks"), "--output_path", str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf_acc = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())["results"]["bmojo_choice"]
    ours = simple_evaluate(
        model="bmojo", model_args=f"pretrained={tmp_path / 'model'}", batch_size=1, tasks=["bmojo_choice"],
        task_manager=TaskManager(include_path=str(root / "tasks"), include_defaults=False),
    )["results"]["bmojo_choice"]  # fmt: skip
    assert hf_acc["acc,none"] == pytest.approx(ours["acc,none"])
