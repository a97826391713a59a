"""The command line runs end to end on small settings."""

from typer.testing import CliRunner

from bmojo.cli import app


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
