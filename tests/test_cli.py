"""The command line runs end to end on small settings, and ends bad input in one error line."""

import json
from pathlib import Path

from typer.testing import CliRunner

from bmojo.cli import app
from bmojo.models import BMojoConfig, BMojoForCausalLM


def test_archs_prints_every_preset_and_small_parity_error():
    result = CliRunner().invoke(app, ["archs", "--lengths", "32,96"])
    assert result.exit_code == 0, result.output
    for name in ("transformer", "swa", "mamba", "mamba2", "jamba", "bmojo-f", "bmojo"):
        assert name in result.output
    assert "cache @ 96" in result.output


def test_info_lists_paper_sizes():
    result = CliRunner().invoke(app, ["info", "--size", "130m"])
    assert result.exit_code == 0, result.output
    assert "bmojo" in result.output and "M" in result.output


def test_bad_options_are_named():
    for args, expected in [
        (["archs", "--lengths", "abc"], "--lengths takes comma-separated integers >= 1"),
        (["info", "--size", "7b"], "unknown size '7b'"),
        (["demo", "--steps", "0"], "greater than or equal to 1"),
        (["recall", "--steps", "-5"], "greater than or equal to 1"),
        (["bench", "--lengths", "0,-8"], "--lengths takes comma-separated integers >= 1"),
    ]:
        result = CliRunner().invoke(app, args)
        assert result.exit_code != 0 and expected in " ".join(result.output.replace("│", " ").split()), result.output


def clean_error(args: list[str], *expected: str, exit_code: int = 1) -> str:
    """Run the CLI; assert it ended through its error handling (no uncaught exception) with the expected messages."""
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, SystemExit) and result.exit_code == exit_code, (result.output, result.exception)
    message = " ".join(result.stderr.replace("│", " ").split())
    assert all(e in message for e in expected), result.stderr
    return message


def saved_model(folder: Path, corrupt: bool = False) -> Path:
    """A tiny B'MOJO model folder for the byte tokenizer; ``corrupt``: its weights file overwritten with zeros."""
    BMojoForCausalLM(BMojoConfig.from_preset("bmojo", "tiny", vocab_size=257)).save_pretrained(folder)
    if corrupt:
        (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    return folder


def test_train_bad_input_ends_in_one_error_line(tmp_path):
    """Missing data, a binary config, an out_dir that is a file, corrupt init_from / teacher weights and a misspelt
    model_args field: ``error: <message>`` on stderr and exit status 1, not a traceback nor a silent run."""
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    binary = tmp_path / "config.bin"
    binary.write_bytes(bytes(range(256)))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    bad = saved_model(tmp_path / "bad", corrupt=True)
    run = ["train", f"data={text}", "tokenizer=byte", f"cache_dir={tmp_path / 'cache'}", "steps=1", "batch_size=2",
           "seq_len=8", "eval_every=0", "progress=false", "device=cpu"]  # fmt: skip
    for args, expected in [
        (["train", f"data={tmp_path / 'nope.txt'}"], ["error: data source", "nope.txt does not exist"]),
        (["train", "--config", str(binary)], ["error:", "config.bin is not a UTF-8 text file"]),
        ([*run, f"out_dir={a_file}"], ["error: out_dir", "a_file exists and is not a folder"]),
        ([*run, f"out_dir={a_file / 'sub'}"], ["error: out_dir", "a_file exists and is not a folder"]),
        ([*run, f"init_from={bad}", f"out_dir={tmp_path / 'o1'}"], ["error: the weights in", "are unreadable"]),
        ([*run, f"teacher={bad}", f"out_dir={tmp_path / 'o2'}"], ["error: the weights in", "are unreadable"]),
        ([*run, "model_args.windw_size=4", f"out_dir={tmp_path / 'o3'}"],
         ["error: unknown model_args fields ['windw_size']", "'window_size'"]),
        (["recall", "--config", str(binary)], ["error:", "config.bin is not a UTF-8 text file"]),
        (["recall", "--config", str(a_file)], ["error:", "a_file must hold a YAML mapping of recall sweep keys"]),
    ]:  # fmt: skip
        clean_error(args, *expected)
    assert not any((tmp_path / out / "final").exists() for out in ("o1", "o2", "o3"))


def test_eval_and_generate_report_corrupt_weights_and_configs(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("hello world. " * 50)
    bad = saved_model(tmp_path / "bad", corrupt=True)
    for command in (["eval", str(bad), "--data", str(text)], ["generate", str(bad), "--prompt", "hi"]):
        clean_error([*command, "--tokenizer", "byte"], "error: the weights in", "are unreadable")
    wrong = saved_model(tmp_path / "wrong")
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "hidden_size": "x"}))
    for command in (["eval", str(wrong), "--data", str(text)], ["generate", str(wrong), "--prompt", "hi"]):
        clean_error([*command, "--tokenizer", "byte"], "Invalid value:", "hidden_size", "'x'", exit_code=2)


def test_convert_reports_a_config_field_of_the_wrong_type(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "x"}))
    clean_error(["convert", str(tmp_path / "llama"), str(tmp_path / "out")], "error:", "field 'hidden_size'", "str")
    assert not (tmp_path / "out").exists()
