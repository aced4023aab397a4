"""The `tenure` command: help for every subcommand, and user errors as one line + exit 2."""
import subprocess
import sys

import pytest

TENURE = [sys.executable, "-m", "tenure.engine.cli"]


def run(*args):
    return subprocess.run(TENURE + list(args), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [[], ["train"], ["eval"], ["export"], ["data", "inspect"],
                                  ["hf", "check"]])
def test_help_for_every_subcommand(args):
    result = run(*args, "--help")
    assert result.returncode == 0
    assert "usage: tenure" in result.stdout


def test_top_level_help_lists_subcommands():
    out = run("--help").stdout
    for command in ("train", "eval", "export", "data", "hf"):
        assert command in out


def test_unknown_key_is_one_line_exit_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: minilm}\ntask: {kind: seq_cls}\n"
                   "data: {train: x.jsonl}\ntrain: {stepz: 3}\n")
    result = run("train", str(cfg))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {cfg}: unknown config key 'train.stepz'"
    assert "Traceback" not in result.stderr


def test_missing_config_file_exit_2(tmp_path):
    result = run("train", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: config file not found: {tmp_path / 'missing.yaml'}"
