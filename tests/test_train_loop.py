"""The training loop end to end through the CLI, on the tiny BERT fixture: artefacts
(summary, TensorBoard events, orbax checkpoints, HF export), `tenure eval`, exact resume,
and falling back past a corrupt checkpoint."""
import json
import pathlib
import re

import numpy as np
import pytest
from tests.cli_helpers import tenure

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_BERT = ROOT / "tests/fixtures/bert/seq_cls"


@pytest.fixture(scope="module")
def data(tmp_path_factory, head_rows):
    d = tmp_path_factory.mktemp("data")
    return {split: head_rows(f"data/wordnet_lexnames/{split}.jsonl", rows, d / f"{split}.jsonl")
            for split, rows in (("train", 400), ("validation", 48), ("test", 48))}


def train(run_dir, data, steps, *extra):
    return tenure("train", "configs/tasks/seq_cls.yaml", f"model.path={TINY_BERT}", f"run_dir={run_dir}",
                  f"data.train={data['train']}", f"data.validation={data['validation']}",
                  f"data.test={data['test']}", "data.max_length=32", "data.batch_size=8",
                  "data.eval_batch_size=16", f"train.steps={steps}", "train.eval_every=4",
                  "train.log_every=2", "checkpoint.every_steps=4", "checkpoint.keep=5",
                  "optim.schedule=constant", "optim.warmup_ratio=0", "optim.lr=1e-3",
                  "logging.progress=false", *extra)


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data):
    run_dir = tmp_path_factory.mktemp("straight")
    result = train(run_dir, data, 8)
    return run_dir, result


@pytest.mark.slow
def test_artefacts_of_a_run(straight_run):
    run_dir, result = straight_run
    s = summary(run_dir)
    assert len(s["train_loss"]) == 8 and all(np.isfinite(s["train_loss"]))
    assert {"test/accuracy", "test/f1_macro", "validation/accuracy"} <= set(s["final"])
    assert "pretrained + fresh head" in result.stdout and "fine-tuned (step" in result.stdout
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 8]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4, 6, 8]
    assert [round(e.value, 5) for e in loss] == [round(v, 5) for v in s["train_loss"][1::2]]
    assert [e.step for e in events.Scalars("validation/accuracy")] == [4, 8]
    assert (run_dir / "hf" / "config.json").is_file() and (run_dir / "hf" / "model.safetensors").is_file()
    # The final validation scores are those of the eval that saw the chosen weights (reused when
    # they are the last step's, recomputed from the best checkpoint otherwise).
    chosen = next(e for e in s["evals"] if e["step"] == s["best_step"])
    for key in ("validation/accuracy", "validation/loss", "validation/f1_macro"):
        assert s["final"][key] == pytest.approx(chosen[key], abs=1e-6), key


@pytest.mark.slow
def test_eval_command_reproduces_final_metrics(straight_run, data, tmp_path):
    run_dir, _ = straight_run
    s = summary(run_dir)
    result = tenure("eval", "configs/tasks/seq_cls.yaml", "--checkpoint", run_dir, f"model.path={TINY_BERT}",
                    f"data.train={data['train']}", f"data.validation={data['validation']}",
                    f"data.test={data['test']}", "data.max_length=32", "data.eval_batch_size=16")
    printed = dict(re.findall(r"^\s+(test/\S+): ([0-9.]+)$", result.stdout, re.M))
    assert float(printed["test/accuracy"]) == pytest.approx(s["final"]["test/accuracy"], abs=1e-4)
    # The exported HF directory evaluates to the same numbers.
    result = tenure("eval", "configs/tasks/seq_cls.yaml", "--checkpoint", run_dir / "hf",
                    f"data.train={data['train']}", f"data.validation={data['validation']}",
                    f"data.test={data['test']}", "data.max_length=32", "data.eval_batch_size=16")
    printed = dict(re.findall(r"^\s+(test/\S+): ([0-9.]+)$", result.stdout, re.M))
    assert float(printed["test/accuracy"]) == pytest.approx(s["final"]["test/accuracy"], abs=1e-4)


@pytest.mark.slow
def test_resume_continues_exactly(straight_run, data, tmp_path):
    straight_dir, _ = straight_run
    train(tmp_path, data, 4)
    result = train(tmp_path, data, 8)
    assert "resumed from step 4" in result.stdout
    # Same batches, same dropout keys, same optimizer state: the loss curve is identical.
    assert summary(tmp_path)["train_loss"] == summary(straight_dir)["train_loss"]


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(data, tmp_path):
    train(tmp_path, data, 8)
    for f in (tmp_path / "checkpoints" / "8").rglob("*"):
        if f.is_file() and "state" in str(f) and f.stat().st_size > 0:
            f.write_bytes(b"\0" * f.stat().st_size)  # garble every state file of step 8
    result = train(tmp_path, data, 10)
    assert "skipping checkpoint step 8" in result.stdout + result.stderr
    assert "resumed from step 4" in result.stdout
    assert (tmp_path / "checkpoints" / "4").is_dir()  # the last good checkpoint is intact
    assert (tmp_path / "checkpoints" / "8.broken").is_dir()  # the bad one is kept aside
    assert len(summary(tmp_path)["train_loss"]) == 10


@pytest.mark.slow
def test_a_latest_checkpoint_whose_extras_are_damaged_falls_back_too(data, tmp_path):
    """The extras (the config, the stage, the history a resume reads first) of step 8 garbled."""
    train(tmp_path, data, 8)
    (tmp_path / "checkpoints" / "8" / "extra" / "metadata").write_text("{garbage")
    result = train(tmp_path, data, 10)
    assert "skipping checkpoint step 8" in result.stdout + result.stderr
    assert "resumed from step 4" in result.stdout
    assert (tmp_path / "checkpoints" / "8.broken").is_dir() and (tmp_path / "checkpoints" / "4").is_dir()
    assert len(summary(tmp_path)["train_loss"]) == 10


@pytest.mark.slow
def test_summary_records_validation_evals_early_stopping_and_overfit_warnings(data, tmp_path):
    """16 training examples at a high learning rate: validation stalls while the training loss
    falls. summary.json holds every validation eval (with the monitor's train/validation loss gap)
    and the steps where the overfitting monitor warned and early stopping ended the run, the same
    steps the log names (what `tenure study` tabulates for a single-task run)."""
    result = train(tmp_path, data, 60, "data.subset=16", "train.early_stopping.patience=2")
    s = summary(tmp_path)
    assert [e["step"] for e in s["evals"]] == list(range(4, s["stage_ends"][-1] + 1, 4))
    for e in s["evals"]:
        assert e["stage"] == 0 and {"validation/accuracy", "validation/loss", "validation/generalization_gap"} <= set(e)
    logged_stop = re.findall(r"early stopping at step (\d+)", result.stdout)
    logged_warnings = re.findall(r"warning: step (\d+): validation has not improved", result.stdout)
    assert logged_stop and logged_warnings, result.stdout[-3000:]
    assert s["early_stops"] == [{"step": int(logged_stop[0]), "stage": 0}] and s["stage_ends"] == [int(logged_stop[0])]
    assert s["overfit_warnings"] == [{"step": int(w), "stage": 0} for w in logged_warnings]
    assert s["best_step"] < s["stage_ends"][-1]


def test_missing_checkpoint_is_one_line(tmp_path):
    result = tenure("eval", "configs/tasks/seq_cls.yaml", "--checkpoint", tmp_path / "nope", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: checkpoint directory not found: {tmp_path / 'nope'} (give a run dir, "
                                     "its checkpoints dir or one step's dir, e.g. RUN/checkpoints/200)")
