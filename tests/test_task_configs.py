"""Every example config trains for a few steps: the loss goes down and the metric beats chance.
(seq_cls.yaml is not here: tests/test_quickstart.py trains it as the quickstart's task, and the
real MiniLM learns lexnames in every forgetting test.)

Runs `tenure train` in a subprocess on one CPU device (real MiniLM or the tiny Llama
fixture, real data files) with a reduced step count and validation/test cut to their
first rows, then reads the run's summary.json.
"""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.cli_helpers import cli_env
from tenure.engine.config.schema import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def run(tmp_path, head_rows):
    """`run(name, steps, rows, extra)`: configs/tasks/NAME.yaml trained for `steps` steps,
    validation and test cut to their first `rows` rows (written beside the run)."""
    return lambda name, steps, rows, extra=(): _run(name, tmp_path, head_rows, steps, rows, extra)


def _run(name: str, tmp_path, head_rows, steps: int, rows: int, extra: list[str] = ()) -> dict:
    path = ROOT / f"configs/tasks/{name}.yaml"
    base = load_config(path)
    overrides = [f"run_dir={tmp_path / 'run'}", f"train.steps={steps}", f"train.eval_every={steps}",
                 "data.batch_size=8", "data.eval_batch_size=32",  # extra may override "logging.progress=false",
                 f"data.validation={head_rows(base.data.validation, rows, tmp_path / 'val.jsonl')}",
                 f"data.test={head_rows(base.data.test, rows, tmp_path / 'test.jsonl')}",
                 f"data.train={ROOT / base.data.train}", *extra]
    result = subprocess.run([sys.executable, "-m", "tenure.engine.cli", "train", str(path), *overrides],
                            cwd=ROOT, env=cli_env(real_model=True), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    losses = summary["train_loss"]
    assert len(losses) == steps
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < first, f"{name}: train loss did not go down ({first:.4f} -> {last:.4f})"
    assert "fine-tuned (step" in result.stdout  # the before/after table was printed
    return summary


@pytest.mark.long
def test_pair_cls_config(run, tmp_path):
    s = run("pair_cls", steps=30, rows=48,
            extra=["data.max_length=48", "data.batch_size=16", "optim.lr=2e-4"])
    labels = [json.loads(line)["label"] for line in open(tmp_path / "test.jsonl")]
    majority = max(labels.count(x) for x in set(labels)) / len(labels)
    assert s["final"]["test/accuracy"] > majority + 0.05


@pytest.mark.long
def test_ner_config(run):
    s = run("ner", steps=30, rows=48, extra=["optim.lr=3e-4"])
    assert s["final"]["test/f1"] > 0.2  # entity-level F1 of random tags is ~0


@pytest.mark.long
def test_regression_config(run):
    s = run("regression", steps=60, rows=64,
            extra=["data.max_length=48", "data.batch_size=16", "optim.lr=1e-4"])
    assert s["final"]["test/spearman"] > 0.2


@pytest.mark.long
def test_mlm_config(run):
    s = run("mlm", steps=20, rows=32, extra=["data.max_length=32"])
    assert s["final"]["test/perplexity"] < s["baseline"]["test/perplexity"]


@pytest.mark.long
def test_embedding_config(run):
    s = run("embedding", steps=12, rows=64, extra=["data.length_buckets=[48]"])  # one width: half the compiles
    assert s["final"]["test/recall@1"] > 5 / 64  # chance is 1/64


@pytest.mark.slow
def test_sft_decoder_config(run):
    s = run("sft", steps=40, rows=32,
            extra=["task.generation_examples=8", "task.few_shot=1", "task.max_new_tokens=8"])
    assert s["final"]["test/perplexity"] < 0.5 * s["baseline"]["test/perplexity"]
    assert s["final"]["test/perplexity"] < 320  # below a uniform guess over the vocab
    for key in ("test/bleu", "test/rougeL", "test/1shot_bleu"):
        assert key in s["final"] or key in s["baseline"]
