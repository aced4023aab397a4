"""The `tenure` command: help for every subcommand, and user errors as one line + exit 2."""
import pathlib
import subprocess
import sys

import pytest

TENURE = [sys.executable, "-m", "tenure.engine.cli"]
LLAMA = pathlib.Path(__file__).resolve().parent / "fixtures" / "llama"


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


def test_data_inspect_reports_each_task_of_a_staged_config(tmp_path):
    """A staged config (`tasks:` + `stages:`) is inspected task by task; an lm_eval probe's
    documents are the harness's, named and not read."""
    (tmp_path / "a.jsonl").write_text('{"text": "the quick brown fox"}\n{"text": "jumps over"}\n')
    cfg = tmp_path / "staged.yaml"
    cfg.write_text(f"model: {{path: {LLAMA}}}\n"
                   f"tasks:\n  A: {{kind: causal_lm, data: {{train: {tmp_path / 'a.jsonl'}, max_length: 16}}}}\n"
                   "  general: {kind: lm_eval, tasks: [tenure_capitals_mc]}\n"
                   "stages: [{tasks: [A], steps: 1}]\n")
    result = run("data", "inspect", str(cfg))
    assert result.returncode == 0, result.stderr
    sections = result.stdout.strip().split("\n\n")
    assert sections[0].splitlines()[:3] == [
        "task A:", "data: task causal_lm, format text, max_length 16, buckets [16], batch 32",
        f"train ({tmp_path / 'a.jsonl'}): 2 read, 0 bad records, 2 kept"]
    assert sections[1] == ("task general: lm_eval probe of tenure_capitals_mc (lm-eval reads its documents; "
                           "not inspected)")


def test_out_of_range_numbers_are_refused_by_the_parser(capsys):
    """--tolerance, --mfu, --hbm-gib, --num-labels and a cpu:0 topology: exit 2 naming the option."""
    from tenure.engine.cli import build_parser
    from tenure.engine.tools.aot import parse_topology
    from tenure.models.errors import TenureError
    parser = build_parser()
    for argv, message in ((["hf", "check", "d", "--tolerance", "-1"], "argument --tolerance: expected a number at least 0, got -1"),
                          (["hf", "check", "d", "--tolerance", "nan"], "argument --tolerance: expected a number at least 0"),
                          (["compile", "c.yaml", "--topology", "cpu:1", "--mfu", "0"], "argument --mfu: expected a number above 0 and at most 1"),
                          (["compile", "c.yaml", "--topology", "cpu:1", "--hbm-gib", "-1"], "argument --hbm-gib: expected a number above 0"),
                          (["compile", "c.yaml", "--topology", "cpu:1", "--num-labels", "0"], "argument --num-labels: expected a number at least 1")):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert parser.parse_args(["hf", "check", "d", "--tolerance", "0.001"]).tolerance == 0.001
    with pytest.raises(TenureError, match=r"^--topology cpu:0: give at least one device \(cpu:1\)$"):
        parse_topology("cpu:0")


def test_a_command_without_its_config_names_only_the_config_as_missing():
    for command in ("train", "launch", "bench"):
        result = run(command)
        assert result.returncode == 2
        assert result.stderr.strip().endswith("error: the following arguments are required: config"), result.stderr
