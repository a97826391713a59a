"""Perplexity and bits per byte against direct loops; length generalisation; the eval and generate commands."""

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from bmojo import BMojoConfig, BMojoForCausalLM
from bmojo.cli import app
from bmojo.data import ByteTokenizer
from bmojo.evaluate import length_generalisation, perplexity, plot_length_generalisation, windows


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = BMojoConfig.from_preset("bmojo", "tiny", vocab_size=257, window_size=4, eidetic_size=2)
    return BMojoForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 257, size=45).astype(np.uint16)


def _nll(model, context: np.ndarray, target: int) -> float:
    """-log p(target | context) from one full forward pass."""
    ids = torch.as_tensor(context.astype(np.int64))[None]
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0, -1]
    return F.cross_entropy(logits[None], torch.tensor([int(target)])).item()


@pytest.mark.parametrize(("n", "length", "stride"), [(2, 1, 1), (10, 3, 3), (11, 4, 2), (45, 8, 3), (9, 16, 5)])
def test_windows_score_every_target_once(n, length, stride):
    scored = []
    for start, end, k in windows(n, length, stride):
        assert end - start <= length and 1 <= k <= end - start
        scored += range(end - k + 1, end + 1)
    assert scored == list(range(1, n))


def test_non_overlapping_perplexity_matches_a_window_loop(model, tokens):
    result = perplexity(model, tokens, context_length=8, batch_size=3)
    total = 0.0
    for s in range(0, len(tokens) - 1, 8):
        ids = torch.as_tensor(tokens[s : s + 9].astype(np.int64))[None]
        with torch.no_grad():
            logits = model(ids[:, :-1], use_cache=False).logits
        total += F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
    assert result["tokens"] == len(tokens) - 1
    assert result["loss"] == pytest.approx(total / (len(tokens) - 1), rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(total / (len(tokens) - 1)), rel=1e-5)
    assert result["bits_per_byte"] is None


def test_scoring_by_chunks_of_the_lm_head_matches_the_logits(tokens):
    """A B'MOJO model is scored through its LM head ``loss_chunk_size`` tokens at a time (here 3, across windows'
    rows): the loss of its logits (``loss_chunk_size=0``)."""
    losses = []
    for chunk in (3, 0):
        torch.manual_seed(0)
        config = BMojoConfig.from_preset("bmojo", "tiny", vocab_size=257, window_size=4, loss_chunk_size=chunk)
        losses.append(perplexity(BMojoForCausalLM(config), tokens, context_length=16, batch_size=2, stride=5)["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_strided_perplexity_matches_per_token_contexts(model, tokens):
    length, stride = 8, 3
    result = perplexity(model, tokens, context_length=length, batch_size=2, stride=stride)
    # token j is scored in the first window reaching it, which starts at k * stride, k = max(0, ceil((j - L) / S))
    starts = [max(0, math.ceil((j - length) / stride)) * stride for j in range(1, len(tokens))]
    nll = [_nll(model, tokens[s:j], tokens[j]) for j, s in zip(range(1, len(tokens)), starts)]
    assert result["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)


def test_bits_per_byte_formula(model, tokens):
    result = perplexity(model, tokens, context_length=16, num_bytes=60)
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / (60 * math.log(2)))


def test_perplexity_rejects_bad_arguments(model, tokens):
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tokens, context_length=4, stride=5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, tokens[:1], context_length=4)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, tokens.reshape(5, 9), context_length=4)


def test_length_generalisation_rows_and_plot(model, tokens, tmp_path):
    rows = length_generalisation(model, tokens, [16, 4, 8], num_bytes=45)
    assert [r["context_length"] for r in rows] == [4, 8, 16]
    for r in rows:
        assert r["loss"] == pytest.approx(perplexity(model, tokens, r["context_length"])["loss"], rel=1e-6)
        assert r["tokens"] == len(tokens) - 1
    figure = plot_length_generalisation(rows, tmp_path / "plot.png", train_length=4)
    assert figure.stat().st_size > 1000
    with pytest.raises(ValueError, match="too few"):
        length_generalisation(model, tokens, [64])


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model):
    """A saved tiny byte-level model with its tokenizer, and a text file."""
    folder = tmp_path_factory.mktemp("run")
    model.save_pretrained(folder / "model")
    ByteTokenizer().save(folder / "model")
    text = "".join(f"To be, or not to be, line {i}.\n" for i in range(12))
    (folder / "text.txt").write_text(text)
    return folder


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_eval_command_matches_perplexity(saved, model):
    out = _invoke("eval", saved / "model", "--data", saved / "text.txt", "--context-length", 32,
                  "--out", saved / "eval", "--cache-dir", saved / "cache")  # fmt: skip
    assert "perplexity" in out and "bits/byte" in out
    got = json.loads((saved / "eval" / "eval.json").read_text())
    text = (saved / "text.txt").read_bytes()
    want = perplexity(model, np.frombuffer(text, np.uint8), 32, num_bytes=len(text))
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(want["bits_per_byte"], rel=1e-5)


def test_eval_command_length_sweep_writes_table_and_figure(saved):
    _invoke("eval", saved / "model", "--data", saved / "text.txt", "--split", "val", "--val-fraction", 0.5,
            "--lengths", "16,32,64", "--train-length", 16, "--out", saved / "sweep",
            "--cache-dir", saved / "cache")  # fmt: skip
    rows = (saved / "sweep" / "length_generalisation.csv").read_text().splitlines()
    assert rows[0].startswith("context_length,") and len(rows) == 4
    assert (saved / "sweep" / "length_generalisation.png").stat().st_size > 1000
    assert "| 64 |" in (saved / "sweep" / "length_generalisation.md").read_text()


def _fails(*args) -> str:
    """Run a command that must fail; its output with the error box's borders and line breaks removed."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code != 0
    return re.sub(r"[\s│]+", " ", result.output)


def test_eval_and_generate_errors_are_clear(saved, tmp_path):
    assert "not a saved model folder" in _fails("eval", tmp_path, "--data", saved / "text.txt")
    assert "does not exist" in _fails("eval", saved / "model", "--data", tmp_path / "none.txt")
    assert "--split must be" in _fails("eval", saved / "model", "--data", saved / "text.txt", "--split", "test")
    too_long = ("--lengths", "100000", "--cache-dir", saved / "cache")
    assert "too few" in _fails("eval", saved / "model", "--data", saved / "text.txt", *too_long)
    assert "temperature > 0" in _fails("generate", saved / "model", "--prompt", "x", "--temperature", 0)
    assert "beams >= 1" in _fails("generate", saved / "model", "--prompt", "x", "--beams", 0)
    (tmp_path / "config.json").write_text("{}")
    assert "no tokenizer saved" in _fails("generate", tmp_path, "--prompt", "x")
    assert "unknown device 'banana'" in _fails("generate", saved / "model", "--prompt", "x", "--device", "banana")
    assert "greater than or equal to 2" in _fails("eval", saved / "model", "--data", saved / "text.txt",
                                                  "--max-tokens", -3)  # fmt: skip
    assert "--lengths takes comma-separated integers >= 1, got '16,x'" in _fails(
        "eval", saved / "model", "--data", saved / "text.txt", "--lengths", "16,x"
    )


def _greedy(model, ids: list[int], steps: int) -> list[int]:
    """Greedy continuation by full forward passes (no cache)."""
    ids = list(ids)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
        ids.append(int(logits.argmax()))
        if ids[-1] == 256:
            break
    return ids


def test_generate_greedy_matches_a_manual_loop(saved, model):
    prompt = "To be"
    out = _invoke("generate", saved / "model", "--prompt", prompt, "--greedy", "--max-new-tokens", 12)
    expected = ByteTokenizer().decode(_greedy(model, list(prompt.encode()), 12))
    assert out == expected + "\n"


def test_generate_several_prompts_in_one_batch_prints_each_as_alone(saved):
    """Repeated ``--prompt``s of different lengths are one left-padded batch; each prints what it prints alone."""
    prompts, args = ["To be", "or not to", "x"], ("--greedy", "--max-new-tokens", 12)
    opts = [arg for prompt in prompts for arg in ("--prompt", prompt)]
    out = _invoke("generate", saved / "model", *opts, *args)
    assert out == "".join(_invoke("generate", saved / "model", "--prompt", prompt, *args) for prompt in prompts)


def test_generate_beam_search_is_the_models_beam_search(saved, model):
    """``--beams 4 --greedy`` prints the continuation of the model's own beam search (whose agreement with a search
    that recomputes every prefix is tested in tests/models/test_model.py)."""
    out = _invoke("generate", saved / "model", "--prompt", "or not", "--greedy", "--beams", 4, "--max-new-tokens", 8)
    with torch.no_grad():
        ids = model.generate(torch.tensor([list(b"or not")]), max_new_tokens=8, num_beams=4, do_sample=False,
                             eos_token_id=256, pad_token_id=256)  # fmt: skip
    assert out == ByteTokenizer().decode(ids[0].tolist()) + "\n"


@pytest.mark.slow
def test_generate_compiled_matches_a_manual_loop(saved, model):
    prompt = "To be"
    out = _invoke("generate", saved / "model", "--prompt", prompt, "--greedy", "--max-new-tokens", 6, "--compile")
    assert out == ByteTokenizer().decode(_greedy(model, list(prompt.encode()), 6)) + "\n"


def test_generate_sampling_is_seeded_and_top_k_1_is_greedy(saved):
    args = ("generate", saved / "model", "--prompt", "or not", "--max-new-tokens", 10, "--temperature", 1.5)
    assert _invoke(*args, "--seed", 3) == _invoke(*args, "--seed", 3)
    assert len({_invoke(*args, "--seed", s) for s in range(4)}) > 1
    greedy = _invoke("generate", saved / "model", "--prompt", "or not", "--max-new-tokens", 10, "--greedy")
    assert _invoke(*args, "--top-k", 1) == greedy
    assert _invoke(*args, "--top-p", 1e-6) == greedy
