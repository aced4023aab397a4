"""Inputs that used to pass silently or end in a traceback (issue 25), refused through the CLI in
this process before any training: one line, exit code 2. Tiny BERT fixture, tiny data."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tenure.engine.cli import main
from test_run_safety import args
from test_train_loop import data  # noqa: F401  (the `data` fixture)
from tests.cli_helpers import cli_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_BERT = ROOT / "tests/fixtures/bert/seq_cls"
STAGED = ROOT / "configs/continual/split_lexnames.yaml"


def refused(capsys, *argv) -> str:
    """The one stderr line of `tenure ARGV` run in this process, which must exit 2."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def staged(tmp_path, data, *extra):  # noqa: F811
    """`tenure train` of the two-task staged config on the tiny fixtures (run dir under tmp_path)."""
    overrides = [f"model.path={TINY_BERT}", f"run_dir={tmp_path / 'run'}", "logging.progress=false",
                 "stages.0.steps=2", "stages.1.steps=2", "tasks.A.data.pack=false", "tasks.B.data.pack=false"]
    for task in ("A", "B"):
        overrides += [f"tasks.{task}.data.{split}={data[split]}" for split in ("train", "validation", "test")]
        overrides += [f"tasks.{task}.data.batch_size=8", f"tasks.{task}.data.eval_batch_size=16"]
    return ["train", STAGED, *overrides, *extra]


# -- numbers as written ------------------------------------------------------------------------------------

def test_numbers_mean_what_they_say(capsys):
    """YAML 1.1 read `010` as octal 8 and `1:30` as base-60 90; an aliased key (`ewc.lambda`, field
    `lam`) took `true` as 1.0. Integers are decimal (0o/0x written out), a boolean is refused there too."""
    from tenure.engine.config.schema import load_config

    cfg = load_config(STAGED, ["stages.0.steps=010", "ewc.lambda=1_000", "stages.1.steps=0x10"])
    assert (cfg.stages[0].steps, cfg.ewc.lam, cfg.stages[1].steps) == (10, 1000, 16)
    assert refused(capsys, "train", STAGED, "ewc.lambda=true") == (
        f"error: {STAGED}: config key 'ewc.lambda': expected a number, got a boolean (true)")
    assert "stages.0.steps" in refused(capsys, "train", STAGED, "stages.0.steps=1:30")  # not 90

# -- 4: a key written twice -------------------------------------------------------------------------------

def test_a_key_written_twice_is_refused_in_configs_overrides_and_study_files(tmp_path, capsys):
    config = tmp_path / "twice.yaml"
    text = (ROOT / "configs/tasks/seq_cls.yaml").read_text()
    config.write_text(text + "optim:\n  lr: 1.0\n")
    line = len(text.splitlines()) + 1
    first = next(i for i, row in enumerate(text.splitlines(), 1) if row.startswith("optim:"))
    assert refused(capsys, "train", config) == (
        f"error: {config}:{line}: invalid YAML (key 'optim' is written twice (first on line {first}); "
        "YAML would silently keep the last one)")
    # Keys merged in (`<<: *data`, then `labels:`) may be overridden: the staged config loads.
    from tenure.engine.config.schema import load_config
    assert "<<: *data" in STAGED.read_text() and load_config(STAGED).tasks["B"].data.labels[0] == "noun.artifact"
    # ... also through a chain: a mapping merging an anchor that merges another and overrides a key
    # (the check ran after construction had flattened the inner merge: "key 'x' is written twice")
    from tenure.engine.config import yamlfile
    assert yamlfile.load("base: &b {x: 1, y: 2}\na: {inner: &m {<<: *b, x: 5}}\ntop: {<<: *m}\n")["top"] == {
        "x": 5, "y": 2}
    assert refused(capsys, "train", STAGED, "optim={lr: 1, lr: 2}") == (
        "error: override 'optim={lr: 1, lr: 2}': key 'lr' is written twice (first on line 1); "
        "YAML would silently keep the last one")
    study = tmp_path / "study.yaml"
    (tmp_path / "base.yaml").write_text("run_dir: runs/x\n")
    study.write_text("base: base.yaml\nmethods:\n  naive: []\n  naive: [optim.lr=1]\n")
    assert refused(capsys, "study", study) == (
        f"error: {study}:4: invalid YAML (key 'naive' is written twice (first on line 3); "
        "YAML would silently keep the last one)")


# -- 5, 6, 7: labels and splits ------------------------------------------------------------------------------

def test_a_label_no_record_has_is_refused(data, tmp_path, capsys):  # noqa: F811
    line = refused(capsys, *args(tmp_path / "run", data, 2, 'data.labels=["noun.plant", "noun.plnat"]'))
    assert line.startswith(f"error: {data['train']}: data.labels: 'noun.plnat' is not the label of any training "
                           "record; the training data has 'noun.act', ")
    assert "'noun.plant'" in line and not (tmp_path / "run" / "checkpoints").exists()


def test_class_incremental_tasks_with_shared_labels_are_refused(data, tmp_path, capsys):  # noqa: F811
    line = refused(capsys, *staged(tmp_path, data, 'tasks.A.data.labels=["noun.plant", "noun.food"]',
                                   'tasks.B.data.labels=["noun.food", "noun.act"]'))
    assert line == ("error: heads: shared: tasks A and B share the label 'noun.food'; class-incremental tasks "
                    "need disjoint labels (data.labels), or use heads: per_task")


def test_r_columns_from_different_splits_need_the_config_to_say_so(data, tmp_path, capsys):  # noqa: F811
    line = refused(capsys, *staged(tmp_path, data, "tasks.B.data.test=null"))
    assert line == (f"error: {STAGED}: config key 'eval.mixed_splits': R's columns would come from different "
                    "splits (test: A; validation: B); give every task a test split, or set eval.mixed_splits: "
                    "true to accept it")
    from tenure.engine.config.schema import load_config
    from tenure.engine.config.stages import r_split, resolve
    tasks, _ = resolve(load_config(STAGED, staged(tmp_path, data, "tasks.B.data.test=null",
                                                  "eval.mixed_splits=true")[2:]))
    assert {name: r_split(task) for name, task in tasks.items()} == {"A": "test", "B": "validation"}


# -- trainable sections that select nothing they name ------------------------------------------------------

def test_a_lora_target_or_regex_that_matches_no_param_is_refused_before_training(data, tmp_path, capsys):  # noqa: F811
    line = refused(capsys, *args(tmp_path / "run", data, 2, "trainable.mode=lora", "trainable.lora.targets=[qeury]"))
    assert line == ("error: config key 'trainable.lora.targets': 'qeury' matches no linear layer of the model "
                    "(its linear layers: attn_out, key, query, value, intermediate, output)")
    line = refused(capsys, *staged(tmp_path, data, "stages.1.trainable={mode: regex, include: [nomatch_xyz]}"))
    assert line == ("error: config key 'stages.1.trainable.include': 'nomatch_xyz' matches no parameter path "
                    "(paths look like 'backbone/layers_0/attention/attn_out/kernel')")
    # A stage's section inherits the keys it leaves out: the top level's exclude is named.
    line = refused(capsys, *staged(tmp_path, data, "trainable.exclude=[nomatch_xyz]",
                                   "stages.1.trainable={mode: head}"))
    assert line.startswith("error: config key 'trainable.exclude': 'nomatch_xyz' matches no parameter path")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_more_fisher_examples_or_replayed_records_than_a_task_has_are_said(data, tmp_path, capsys):  # noqa: F811
    """Not clamped in silence: all the task's records are used, in a note naming the key (not a
    refusal: it comes at stage 2's start, after stage 1 trained)."""
    for run, extra, note in (
            ("ewc", ["ewc.lambda=10", "ewc.examples=100000"],
             "note: config key 'ewc.examples': 100000 is more than the 93 training records of task A: its Fisher "
             "averages over all 93"),
            ("replay", ["replay.ratio=0.25", "stages.1.replay={buffer: 100000}"],
             "note: config key 'stages.1.replay.buffer': 100000 is more than the 93 training records of task A: "
             "all 93 are replayed")):
        capsys.readouterr()
        assert main([str(a) for a in staged(tmp_path / run, data, "stages.0.steps=1", "stages.1.steps=1", *extra)]) == 0
        assert note in capsys.readouterr().out


# -- 9: field types of every record ----------------------------------------------------------------------------

def test_a_regression_target_written_as_a_word_is_refused_before_training(tmp_path, capsys):
    rows = [{"text": f"w{i}", "label": str(i / 10)} for i in range(40)]  # numeric strings are numbers (CSV)
    rows[33]["label"] = "high"
    train = tmp_path / "sts.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = refused(capsys, "train", "configs/tasks/seq_cls.yaml", f"model.path={TINY_BERT}", f"run_dir={tmp_path / 'r'}",
                   "task.kind=regression", "data.format=text_label", f"data.train={train}", "data.validation=null",
                   "data.test=null", "eval.metric=pearson", "data.batch_size=8", "train.steps=2")
    assert line == f"error: {train}:34: field 'label': expected a number, got string 'high'"


# -- 10: non-finite weights at load ------------------------------------------------------------------------------

def test_a_nan_in_an_unused_embedding_row_is_named_at_load(data, tmp_path, capsys):  # noqa: F811
    model = pathlib.Path(shutil.copytree(TINY_BERT, tmp_path / "model"))
    tensors = load_file(model / "model.safetensors")
    name = next(k for k in tensors if k.endswith("word_embeddings.weight"))
    tensors[name][-1, 3] = np.nan  # the last vocabulary row: no batch of this data reaches it
    save_file(tensors, model / "model.safetensors")
    line = refused(capsys, *args(tmp_path / "run", data, 2, f"model.path={model}"))
    assert line == (f"error: {model}/model.safetensors: tensor '{name}' holds non-finite values (NaN or Inf); "
                    "the weights are damaged: download or convert them again")


# -- 12: one line where a traceback was ------------------------------------------------------------------------

def test_empty_stages_and_a_guard_without_validation_are_config_errors(data, tmp_path, capsys):  # noqa: F811
    assert refused(capsys, *staged(tmp_path, data, "stages=[]")) == (
        f"error: {STAGED}: config key 'stages': the list is empty; list at least one stage (`tasks`, `steps`)")
    guard = 'stages.1.guard={"task": "A", "max_drop": 0.1}'
    assert refused(capsys, *staged(tmp_path, data, guard, "tasks.A.data.validation=null", "eval.mixed_splits=true")) == (
        f"error: {STAGED}: config key 'stages.1.guard.task': task 'A' has no validation split "
        "(tasks.A.data.validation), which the guard watches")


def test_a_batch_that_does_not_divide_over_the_devices_is_one_line(data, tmp_path, capsys):  # noqa: F811
    import jax
    devices = jax.device_count()  # the test session's simulated CPU devices, one process
    assert devices > 1
    line = refused(capsys, *args(tmp_path / "run", data, 2, f"data.batch_size={devices + 2}"))
    assert line == (f"error: config key 'data.batch_size': {devices + 2} is not divisible by data x fsdp = {devices} "
                    f"and 1 processes; use a multiple of {devices}")


# -- 13: messages that blamed the wrong thing ---------------------------------------------------------------------

def test_an_unknown_bench_key_is_one_line(capsys):
    assert refused(capsys, "bench", "configs/bench/minilm.yaml", "bench.nope=1") == (
        "error: configs/bench/minilm.yaml: unknown config key 'bench.nope'")


def test_launch_help_needs_no_tpu_settings():
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE")}
    result = subprocess.run(["bash", ROOT / "tpu/launch.sh", "--help"], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("# Run tenure on a Cloud TPU VM") and "TPU_NAME, ZONE" in result.stdout


def test_hf_check_names_the_tensor_when_the_config_disagrees_with_the_weights(tmp_path, capsys):
    """The HF reference run (a stand-in torch python that fails as transformers does, pointing at a
    report it printed above) is not the message: the engine's own load names the tensor."""
    model = pathlib.Path(shutil.copytree(TINY_BERT, tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] = 2 * config["intermediate_size"]
    (model / "config.json").write_text(json.dumps(config))
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'RuntimeError: Error(s) in loading state_dict: look at the above report' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    os.environ["TENURE_TORCH_PYTHON"] = str(fake)
    try:
        line = refused(capsys, "hf", "check", model)
    finally:
        del os.environ["TENURE_TORCH_PYTHON"]
    size = config["intermediate_size"]
    assert line == (f"error: pretrained weights: backbone/layers_0/mlp/intermediate/bias has shape ({size // 2},), "
                    f"the model expects ({size},)")


def test_a_study_stopped_by_sigterm_exits_143_as_train_does(data, tmp_path):  # noqa: F811
    base = tmp_path / "base.yaml"
    base.write_text((ROOT / "configs/tasks/seq_cls.yaml").read_text())
    study = tmp_path / "study.yaml"
    study.write_text("base: base.yaml\nmethods:\n  long: [" + ", ".join(
        args("x", data, 100000)[3:]).replace("run_dir=x, ", "") + "]\n")
    proc = subprocess.Popen([sys.executable, "-m", "tenure.engine.cli", "study", study, "--out", tmp_path / "out"], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out").rglob("study.log")) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "stopped by SIGTERM", err[-2000:]
