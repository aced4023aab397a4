"""Staged (continual) runs end to end through the CLI on the tiny BERT fixture: the accuracy
matrix and its files, null equivalence of the regularisers, exact resume after SIGKILL in the
middle of stage 2 of a 3-stage run with EWC and replay, and config errors."""
import itertools
import math
import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tenure.engine.runtime.checkpoint import Checkpointer
from tenure.engine.config.schema import load_config
from tenure.engine.continual.forgetting_metrics import summarize
from tenure.engine.config.stages import SINGLE_TASK, resolve, score_mode
from tenure.models.errors import TenureError
from tests.cli_helpers import cli_env, study_records, tenure

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_BERT = ROOT / "tests/fixtures/bert/seq_cls"
CONFIG = ROOT / "configs/continual/split_lexnames.yaml"
LABELS = {"A": ["noun.animal", "noun.plant"], "B": ["noun.artifact", "noun.person"],
          "C": ["noun.food", "noun.body"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    out = {}
    for split, rows in (("train", 2000), ("validation", 300), ("test", 300)):
        out[split] = d / f"{split}.jsonl"
        out[split].write_text("".join(itertools.islice(open(ROOT / f"data/wordnet_lexnames/{split}.jsonl"), rows)))
    return out


def staged_args(run_dir, data, stages=2, steps=6, *extra):
    args = [f"model.path={TINY_BERT}", f"run_dir={run_dir}", "logging.progress=false",
            "train.eval_every=3", "checkpoint.every_steps=2", "checkpoint.keep=20", "optim.lr=1e-3",
            "optim.warmup_ratio=0", "optim.schedule=constant", "ewc.examples=24"]
    for name in ("A", "B"):
        args += [f"tasks.{name}.data.{split}={data[split]}" for split in ("train", "validation", "test")]
        args += [f"tasks.{name}.data.labels={json.dumps(LABELS[name])}", f"tasks.{name}.data.batch_size=8",
                 f"tasks.{name}.data.eval_batch_size=32"]
    args += [f"stages.{i}.steps={steps}" for i in range(2)]
    if stages == 3:  # a third stage back on A's data under another name would need a task C
        args += ["stages=" + json.dumps([{"tasks": ["A"], "steps": steps}, {"tasks": ["B"], "steps": steps},
                                        {"tasks": ["C"], "steps": steps}]),
                 "tasks.C=" + json.dumps({"kind": "seq_cls", "data": {
                     "train": str(data["train"]), "validation": str(data["validation"]), "test": str(data["test"]),
                     "labels": LABELS["C"], "batch_size": 8, "eval_batch_size": 32, "max_length": 32}})]
    return [*args, *extra]




def train(run_dir, data, *extra, stages=2, check=True):
    return tenure("train", CONFIG, *staged_args(run_dir, data, stages, 6, *extra), check=check)


def record(run_dir):
    return json.loads((run_dir / "forgetting.json").read_text())


def weights(run_dir) -> bytes:
    return (run_dir / "hf" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def naive_run(tmp_path_factory, data):
    run_dir = tmp_path_factory.mktemp("naive")
    return run_dir, train(run_dir, data, "eval.kl_to_start=true")   # a measurement: training is unchanged


@pytest.mark.slow
def test_staged_run_fills_the_accuracy_matrix(naive_run):
    run_dir, result = naive_run
    rec = record(run_dir)
    assert rec["tasks"] == ["A", "B"] and rec["stages"] == ["A", "B"]
    R = np.asarray(rec["R"])
    assert R.shape == (2, 2) and np.all((R >= 0) & (R <= 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    # R's last row is the final test accuracy of each task; the summaries are R's.
    assert R[1, 0] == pytest.approx(summary["final"]["test/A/accuracy"])
    assert R[1, 1] == pytest.approx(summary["final"]["test/B/accuracy"])
    assert rec["summary"]["bwt"] == pytest.approx(summarize(R, rec["start_row"]).bwt)
    assert rec["summary"]["acc"] == pytest.approx(R[1].mean())
    # Curves: the start, then every eval of every task over global steps (3, 6 | 9, 12).
    assert [c["step"] for c in rec["curves"]] == [0, 3, 6, 9, 12]
    assert rec["stage_ends"] == [6, 12]
    assert set(rec["curves"][2]["scores"]) == {"A", "B"}
    # The stage-1 end row equals the last eval of stage 1 on A? No: R uses test, curves validation.
    assert "accuracy matrix R" in result.stdout and "after B" in result.stdout
    # Stability gap (De Lange et al. 2023): A's last eval before stage B (step 6) minus its worst in B
    a_at = {c["step"]: c["scores"]["A"] for c in rec["curves"]}
    (gap,) = rec["stability_gap"]
    assert gap["stage"] == 1 and gap["worst_within_stage"] == {"A": min(a_at[9], a_at[12])}
    assert gap["gap_within_stage"]["A"] == pytest.approx(a_at[6] - min(a_at[9], a_at[12]))
    assert gap["min_acc"] == pytest.approx(min(a_at[9], a_at[12]))
    assert "stability gap in B: A " in result.stdout
    png = (run_dir / "forgetting.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    csv_rows = (run_dir / "forgetting.csv").read_text().splitlines()
    assert csv_rows[0] == "row,A,B" and csv_rows[-1].startswith("after B,")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("validation/A/accuracy")] == [3, 6, 9, 12]
    assert [e.step for e in events.Scalars("R/B")] == [6, 12]


@pytest.mark.slow
def test_zero_strength_regularisers_change_nothing(naive_run, data, tmp_path):
    """lambda = 0 and alpha = 0 run the Fisher pass and both penalties, and leave every loss and
    weight of plain sequential fine-tuning unchanged, bit for bit."""
    run_dir, _ = naive_run
    result = train(tmp_path, data, "ewc.lambda=0", "l2sp.alpha=0")
    assert "losses task/B, ewc, l2sp" in result.stdout
    got, want = json.loads((tmp_path / "summary.json").read_text()), json.loads((run_dir / "summary.json").read_text())
    assert got["train_loss"] == want["train_loss"]
    assert weights(tmp_path) == weights(run_dir)
    assert record(tmp_path)["R"] == record(run_dir)["R"]


@pytest.mark.slow
def test_a_run_without_checkpoints_computes_the_same(naive_run, data, tmp_path):
    """checkpoint.enabled=false (a study's runs whose checkpoints it would delete): the same losses,
    R and exported weights, no checkpoint step written, and nothing to branch from."""
    from tenure.engine.continual.branch import source_checkpoints

    run_dir, _ = naive_run
    result = train(tmp_path, data, "checkpoint.enabled=false")
    assert "checkpoints: none (checkpoint.enabled=false)" in result.stdout
    got, want = json.loads((tmp_path / "summary.json").read_text()), json.loads((run_dir / "summary.json").read_text())
    assert got["train_loss"] == want["train_loss"] and got["checkpoints"] is None
    assert record(tmp_path)["R"] == record(run_dir)["R"] and weights(tmp_path) == weights(run_dir)
    assert not list((tmp_path / "checkpoints").glob("[0-9]*")) and list((run_dir / "checkpoints").glob("[0-9]*"))
    with pytest.raises(TenureError, match="was trained with checkpoint.enabled=false: it has no checkpoints to branch"):
        source_checkpoints(str(tmp_path))


@pytest.mark.slow
def test_a_broken_newest_checkpoint_falls_back_into_the_stage_before(naive_run, data, tmp_path):
    """The newest checkpoint (step 8, stage B) has damaged arrays: the resume skips it and restores step 6,
    stage A's end, with stage A's own state, then trains stage B again: the same R and weights as the
    unbroken run. It took step 6's arrays as stage B's (its stage index came from step 8's extras) and
    finished B at once, on A's weights."""
    import shutil

    run_dir, _ = naive_run
    shutil.copytree(run_dir / "checkpoints", tmp_path / "checkpoints")
    for step in ("9", "10", "12"):
        shutil.rmtree(tmp_path / "checkpoints" / step)
    for chunk in (tmp_path / "checkpoints" / "8" / "state" / "d").iterdir():
        damaged = bytearray(chunk.read_bytes())
        damaged[-3] ^= 0xFF  # one flipped byte: the OCDBT checksum catches it
        chunk.write_bytes(bytes(damaged))
    result = train(tmp_path, data, "eval.kl_to_start=true")
    assert "skipping checkpoint step 8" in result.stdout and "resumed from step 6" in result.stdout
    assert record(tmp_path)["R"] == record(run_dir)["R"] and weights(tmp_path) == weights(run_dir)


@pytest.mark.slow
def test_regularisers_and_replay_change_training(naive_run, data, tmp_path):
    run_dir, _ = naive_run
    train(tmp_path, data, "ewc.lambda=1000", "replay.ratio=0.25")
    got = json.loads((tmp_path / "summary.json").read_text())["train_loss"]
    want = json.loads((run_dir / "summary.json").read_text())["train_loss"]
    assert got[:6] == want[:6]  # stage 1 has nothing to protect or replay
    assert got[6:] != want[6:]


@pytest.mark.slow
def test_sigkill_in_stage_two_resumes_bit_exact(data, tmp_path):
    extra = ("ewc.lambda=100", "replay.ratio=0.25", "replay.buffer=16")
    straight = tmp_path / "straight"
    train(straight, data, *extra, stages=3)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tenure.engine.cli", "train", str(CONFIG),
                             *staged_args(killed, data, 3, 6, *extra)], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "8").is_dir():  # step 8 = step 2 of stage 2
        assert proc.poll() is None and time.time() < deadline, "run ended before stage 2"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert 8 <= max(steps) < 12, steps
    result = train(killed, data, *extra, stages=3)
    assert "resumed from step" in result.stdout
    assert weights(killed) == weights(straight)
    assert record(killed)["R"] == record(straight)["R"]
    assert record(killed)["curves"] == record(straight)["curves"]


STAGE_A_ONLY = "stages=" + json.dumps([{"tasks": ["A"], "steps": 6}])


@pytest.fixture(scope="module")
def stage_a_run(tmp_path_factory, data):
    """The config cut to stage A: what the methods of a study share."""
    run_dir = tmp_path_factory.mktemp("stage_a")
    train(run_dir, data, STAGE_A_ONLY)
    return run_dir


@pytest.mark.slow
def test_a_branch_after_stage_a_trains_stage_b_as_the_whole_run_does(stage_a_run, data, tmp_path):
    """EWC and replay set for every stage act from stage B on, so they branch from the naive
    stage A; the branch ends with the whole run's weights, losses, R and curves, bit for bit."""
    methods = ("ewc.lambda=1000", "replay.ratio=0.25")
    whole, branch = tmp_path / "whole", tmp_path / "branch"
    train(whole, data, *methods)
    result = train(branch, data, *methods, f"branch_from={stage_a_run}")
    assert f"branched from {stage_a_run} after stage A" in result.stdout
    # Stage A's last checkpoint carries R's row for A, so the branch starts without evaluating it again.
    with Checkpointer(None, stage_a_run / "checkpoints", read_only=True) as ckpt:
        saved = ckpt.read_extra(ckpt.latest_step())["history"]
    assert saved["R"] == [dict(zip(record(stage_a_run)["tasks"], record(stage_a_run)["R"][0]))]
    assert saved["stage_ends"] == [6]
    got, want = json.loads((branch / "summary.json").read_text()), json.loads((whole / "summary.json").read_text())
    assert len(want["train_loss"]) == 12 and got["train_loss"] == want["train_loss"]
    assert weights(branch) == weights(whole)
    assert record(branch)["R"] == record(whole)["R"]
    assert record(branch)["curves"] == record(whole)["curves"]
    assert record(branch)["start_row"] == record(whole)["start_row"]
    # Its stage B interpolates from stage A's end, which only the source's checkpoints hold: the
    # same curve as the whole run's (at alpha 0 stage B's shared head scores A's weights).
    curves = {}
    for run in (whole, branch):
        tenure("interpolate", str(run), "--alphas", "0,0.5,1")
        curves[run] = json.loads((run / "interpolation" / "stage1.json").read_text())["rows"]
    assert curves[branch] == curves[whole]
    assert [curves[branch][2]["scores"][t] for t in ("A", "B")] == record(branch)["R"][1]


@pytest.mark.slow
def test_a_branch_whose_first_stages_differ_is_refused(stage_a_run, data, tmp_path):
    def refused(*extra):
        result = train(tmp_path / "branch", data, *extra, f"branch_from={stage_a_run}", check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert not (tmp_path / "branch" / "summary.json").exists()
        return result.stderr.strip().splitlines()[-1]

    assert "train.seed: 0 -> 1" in refused("train.seed=1")
    assert "stages_run.0.steps: 6 -> 5" in refused("stages.0.steps=5")
    line = refused("l2sp.alpha=1.0")  # L2-SP acts in stage A too
    assert line.startswith(f"error: branch_from: {stage_a_run}: its first 1 stage differ") and "l2sp" in line
    assert "nothing would be left to train" in refused(STAGE_A_ONLY)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    line = train(tmp_path / "b2", data, f"branch_from={unfinished}", check=False).stderr.strip().splitlines()[-1]
    assert line == f"error: branch_from: {unfinished} is not a finished run (no summary.json; branch from a run that ran to its end)"


def test_replay_term_is_the_mean_over_earlier_tasks():
    """replay.loss=separate: stage D of four replays A, B and C: each replayed task's term weighs
    replay.weight / 3, so the replay term is the mean of their losses (not their sum) and the new
    task keeps its pull."""
    import jax.numpy as jnp

    from tenure.engine.train.build import RunTask, Tasks, stage_losses
    from tenure.engine.tasks.losses import total_loss

    cfg = load_config(ROOT / "configs/forgetting/split_lexnames.yaml",
                      ["replay.ratio=0.25", "replay.loss=separate", "replay.weight=0.6"])
    tasks, stages = resolve(cfg)
    run_tasks = Tasks({name: RunTask(task, i, None, {}) for i, (name, task) in enumerate(tasks.items())},
                      "classification", None, True)
    losses = stage_losses(run_tasks, stages[3])
    assert list(losses) == ["task/D", "replay/A", "replay/B", "replay/C"]
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 8)
    task_id = np.array([3, 3, 3, 3, 3, 0, 1, 2])
    batch = {"labels": jnp.asarray(labels), "task_id": jnp.asarray(task_id), "example_mask": jnp.ones(8)}
    total, metrics = total_loss(losses, None, {"logits": jnp.asarray(logits)}, batch, {})
    nll = np.log(np.exp(logits).sum(-1)) - logits[np.arange(8), labels]
    assert float(metrics["loss/task/D"]) == pytest.approx(nll[:5].mean(), rel=1e-5)
    for name, row in (("A", 5), ("B", 6), ("C", 7)):
        assert float(metrics[f"loss/replay/{name}"]) == pytest.approx(0.6 / 3 * nll[row], rel=1e-5)
    assert float(total) == pytest.approx(nll[:5].mean() + 0.6 * nll[5:].mean(), rel=1e-5)


def _replayed_gradient_share(config, overrides, stage, outputs_fn, batch, replayed_rows, targets_fn):
    """The replayed rows' share of the loss gradient: d loss / d logits is, per unit (example or
    token), its weight in the mean times (softmax - one_hot), so a unit's weight is the ratio of
    their norms; the share is the replayed units' weights over all."""
    import jax
    import jax.numpy as jnp

    from tenure.engine.train.build import RunTask, Tasks, stage_losses
    from tenure.engine.tasks.losses import total_loss

    tasks, stages = resolve(load_config(ROOT / config, overrides))
    run_tasks = Tasks({name: RunTask(task, i, None, {}) for i, (name, task) in enumerate(tasks.items())},
                      "head", None, True)
    losses = stage_losses(run_tasks, stages[stage])
    logits = outputs_fn()
    (_, metrics), d_logits = jax.value_and_grad(
        lambda z: total_loss(losses, None, {"logits": z}, batch, {}), has_aux=True)(jnp.asarray(logits))
    used_logits, targets, valid = targets_fn(logits)
    p = np.exp(used_logits - used_logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    residual = p - np.eye(p.shape[-1])[targets]
    d = np.asarray(targets_fn(np.asarray(d_logits))[0])
    weight = np.where(valid, np.linalg.norm(d, axis=-1) / np.linalg.norm(residual, axis=-1), 0.0)
    weight = weight.reshape(len(weight), -1).sum(-1)   # per example
    return weight[replayed_rows].sum() / weight.sum(), metrics, losses


def test_replay_ratio_is_the_replayed_share_of_the_loss_gradient():
    """replay.loss=mean (the default): one mean over the batch, so with ratio r = 0.25 (2 replayed
    examples of A among 8) the replayed share of the loss gradient is 0.25; the separate form
    (mean(new) + 1 x mean(replayed)) gives them half."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(8, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 8)
    batch = {"labels": labels, "task_id": np.array([1, 1, 1, 0, 1, 1, 1, 0]), "example_mask": np.ones(8, np.float32)}
    replayed = batch["task_id"] == 0
    targets = lambda z: (z, labels, np.ones(8, bool))
    share, metrics, losses = _replayed_gradient_share("configs/forgetting/split_lexnames.yaml", ["replay.ratio=0.25"],
                                                      1, lambda: logits, batch, replayed, targets)
    assert list(losses) == ["task"]
    assert share == pytest.approx(0.25, abs=1e-6)
    assert float(metrics["task/replay_share"]) == pytest.approx(0.25, abs=1e-7)
    nll = np.log(np.exp(logits.astype(np.float64)).sum(-1)) - logits[np.arange(8), labels]
    assert float(metrics["loss"]) == pytest.approx(nll.mean(), rel=1e-5)        # one mean over all 8
    assert float(metrics["task/A/loss"]) == pytest.approx(nll[replayed].mean(), rel=1e-5)
    share, _, _ = _replayed_gradient_share("configs/forgetting/split_lexnames.yaml",
                                           ["replay.ratio=0.25", "replay.loss=separate"], 1, lambda: logits, batch,
                                           replayed, targets)
    assert share == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(TenureError, match=r"replay.weight=0.5 applies only with replay.loss: separate"):
        load_config(CONFIG, ["replay.ratio=0.25", "replay.weight=0.5"])


def test_replay_share_of_a_token_kind_is_its_share_of_the_labelled_tokens():
    """Causal LM + SFT (study 3's tasks): the one mean is over labelled tokens, so the replayed
    share of the gradient is the replayed rows' share of the labelled tokens: 0.25 when every row
    has as many (1 row of A among 4), 6 / 12 when A's row has three times as many as each SFT row."""
    rng = np.random.default_rng(4)
    rows, length, vocab = 4, 8, 11
    logits = rng.normal(size=(rows, length, vocab)).astype(np.float32)
    task_id = np.array([1, 0, 1, 1])                     # row 1 replays A (causal LM), the rest are B (SFT)
    for new_tokens, old_tokens, want in ((3, 3, 0.25), (2, 6, 0.5)):
        labels = rng.integers(0, vocab, (rows, length))
        labels[task_id == 1, :length - new_tokens] = -100        # SFT rows: the prompt is unlabelled
        labels[1, :length - old_tokens] = -100
        batch = {"labels": labels, "task_id": task_id, "example_mask": np.ones(rows, np.float32)}
        valid = labels[:, 1:] != -100                            # position t predicts labels[t + 1]
        assert valid.sum(1).tolist() == [new_tokens, old_tokens, new_tokens, new_tokens]
        targets = lambda z: (z[:, :-1], np.maximum(labels[:, 1:], 0), valid)
        share, metrics, _ = _replayed_gradient_share("configs/forgetting/decoder_lm.yaml",
                                                     ["stages.1.replay.ratio=0.25"], 1, lambda: logits, batch,
                                                     task_id == 0, targets)
        assert share == pytest.approx(want, abs=1e-6)
        assert float(metrics["task/replay_share"]) == pytest.approx(want, abs=1e-6)


def test_stage_config_resolves_and_names_bad_keys(tmp_path):
    cfg = load_config(CONFIG, ["stages.1.steps=7", "replay.ratio=0.2", "stages.1.ewc.lambda=5"])
    tasks, stages = resolve(cfg)
    assert list(tasks) == ["A", "B"] and [s.steps for s in stages] == [80, 7]
    assert stages[1].replay.ratio == 0.2 and stages[1].earlier == ("A",)
    assert stages[1].ewc.lam == 5 and stages[0].ewc.lam == 0
    with pytest.raises(TenureError, match=r"'stages.1.tasks': unknown task 'Z'"):
        resolve(load_config(CONFIG, ["stages.1.tasks=[Z]"]))
    with pytest.raises(TenureError, match=r"'stages' has 2 items, no item '5'"):
        load_config(CONFIG, ["stages.5.steps=3"])
    with pytest.raises(TenureError, match=r"unknown config key 'stages.0.ewc.lamda'"):
        load_config(CONFIG, ["stages.0.ewc.lamda=3"])
    with pytest.raises(TenureError, match=r"'stages.1.guard.task': 'B' is not trained in an earlier stage"):
        resolve(load_config(CONFIG, ["stages.1.guard={task: B, max_drop: 0.1}"]))
    # The guard keeps a stage's best weights by its own tasks' validation score: B needs one (was a KeyError).
    with pytest.raises(TenureError, match=r"'stages.1.guard': the guard keeps .* B has no validation split"):
        resolve(load_config(CONFIG, ["stages.1.guard={task: A, max_drop: 0.1}", "tasks.B.data.validation=null"]))
    # train.steps is a single-task key: a staged run read nothing of it and trained stages.N.steps.
    with pytest.raises(TenureError, match=r"'train.steps': a staged run counts its steps per stage"):
        resolve(load_config(CONFIG, ["train.steps=5"]))


def test_which_direction_of_a_score_is_better():
    assert score_mode(["min"], None) == "min" and score_mode(["max", "max"], "min") == "max"
    assert score_mode(["min", "max"], "min") == "min" and score_mode(["min", "max"], None) == "max"
    # A single task's eval.mode left unset follows its metric: a perplexity is better lower.
    sft = ROOT / "configs/tasks/sft.yaml"
    assert resolve(load_config(sft, ["eval.mode=null"]))[0][SINGLE_TASK].mode == "min"
    assert resolve(load_config(ROOT / "configs/tasks/seq_cls.yaml", []))[0][SINGLE_TASK].mode == "max"


def test_a_stage_section_overrides_only_the_keys_it_sets():
    """stages.1.ewc={examples: 32} keeps the top level's lambda; stages.1.optim={lr: ...} its
    optimizer, momentum and schedule; a loss weight at or below 0 is refused."""
    cfg = load_config(CONFIG, ["ewc.lambda=1000", "ewc.examples=16", "stages.1.ewc={examples: 32}",
                               "optim={name: sgd, lr: 0.05, momentum: 0.9, schedule: constant}",
                               "stages.1.optim={lr: 0.01}", "stages.1.trainable={mode: head}"])
    _, stages = resolve(cfg)
    assert [(s.ewc.lam, s.ewc.examples) for s in stages] == [(1000, 16), (1000, 32)]
    assert [(s.optim.name, s.optim.lr, s.optim.momentum, s.optim.schedule) for s in stages] == [
        ("sgd", 0.05, 0.9, "constant"), ("sgd", 0.01, 0.9, "constant")]
    assert [s.trainable.mode for s in stages] == ["full", "head"]
    for weight in (-1, 0):
        with pytest.raises(TenureError, match=rf"'stages.1.tasks.A': loss weight {weight}(.0)? must be above 0"):
            resolve(load_config(CONFIG, [f"stages.1.tasks={{B: 1.0, A: {weight}}}"]))
    with pytest.raises(TenureError, match=r"'stages.0.tasks': a task is named twice \(A, A\)"):
        resolve(load_config(CONFIG, ["stages.0.tasks=[A, A]"]))
    # the first stage's own EWC or replay section, with nothing earlier to keep, is refused, not ignored
    for section in ("ewc={lambda: 100}", "replay={ratio: 0.2}"):
        with pytest.raises(TenureError, match=rf"'stages.0.{section.split('=')[0]}': the first stage has no earlier"):
            resolve(load_config(CONFIG, [f"stages.0.{section}"]))
    assert resolve(load_config(CONFIG, ["ewc.lambda=100", "replay.ratio=0.2"]))[1][0].ewc.lam == 100  # top level: fine
    with pytest.raises(TenureError, match=r"'stages.1.optim' with the top-level section's other keys: .*momentum "
                                          r"applies to sgd, not adamw"):
        resolve(load_config(CONFIG, ["optim={name: sgd, momentum: 0.9}", "stages.1.optim={name: adamw}"]))


def test_an_anchor_at_random_initial_weights_is_refused():
    """Study 3's model is trained from scratch (model.init: random), so its 'pretrained' weights
    are the random initialisation: L2-SP or the KL term anchored there would pull stage B toward
    noise (study 3b's L2-SP did: A's perplexity 301 -> 351 at alpha 0.01), not keep stage A."""
    config = ROOT / "configs/forgetting/decoder_lm.yaml"
    for term, on in (("l2sp", "stages.1.l2sp.alpha=0.01"), ("kl", "stages.1.kl.weight=1.0")):
        with pytest.raises(TenureError, match=rf"stage 1: {term}.anchor=pretrained with model.init=random anchors "
                                              rf"to the random initial weights; set {term}.anchor=stage_start"):
            load_config(config, [on, f"stages.1.{term}.anchor=pretrained"])
    cfg = load_config(config, ["stages.1.l2sp.alpha=0.01", "stages.1.l2sp.anchor=stage_start"])
    assert resolve(cfg)[1][1].l2sp.anchor == "stage_start"


@pytest.mark.long
@pytest.mark.timeout(2400)  # stage A, then three stage-B branches of the real MiniLM
def test_minilm_class_incremental_replay_forgets_far_less(tmp_path, head_rows):
    """The real pretrained MiniLM, 8 lexname classes split into two tasks, one shared head: plain
    sequential fine-tuning loses task A (its classes are never predicted again), replaying
    1 old example in 4 keeps most of it, and EWC's gain over naive is a fraction of replay's
    (van de Ven & Tolias 2019: in class-IL regularisation does not keep old classes)."""
    # R and the curves on test (its first half: 42-62 glosses a class), as the forgetting studies
    # do: no validation pass to pay for. Stage A once, in one worker process with the three
    # stage-B branches (they differ from stage B on), 20 steps a stage. Here (AVX2 Zen 3, fp32)
    # A reaches 0.892; naive and EWC forget all of it (0.892), replay 0.113.
    test = head_rows("data/wordnet_lexnames/test.jsonl", 800, tmp_path / "test.jsonl")
    common = ["train.eval_every=40", "logging.progress=false", "ewc.examples=64", "tasks.A.data.validation=null",
              "tasks.B.data.validation=null", f"tasks.A.data.test={test}", f"tasks.B.data.test={test}",
              "stages.0.steps=20", "stages.1.steps=20"]
    runs = study_records(tmp_path, {"base": str(CONFIG), "keep_checkpoints": False, "methods": {
        "naive": common, "replay": ["replay.ratio=0.25", *common], "ewc": ["stages.1.ewc.lambda=100000", *common]}})
    naive, replay, ewc = (runs[f"{method}/seed0"] for method in ("naive", "replay", "ewc"))
    assert naive["R"][0] == replay["R"][0] == ewc["R"][0]           # one stage A
    naive_forgets = naive["summary"]["forgetting_max"]
    replay_gain = naive_forgets - replay["summary"]["forgetting_max"]
    ewc_gain = naive_forgets - ewc["summary"]["forgetting_max"]
    assert replay_gain > 3 * max(ewc_gain, 0.0) + 0.2, (replay_gain, ewc_gain)
    assert naive["R"][0][0] > 0.8 and replay["R"][0][0] > 0.8       # both learn A first
    # and then B (replay: a quarter of every batch and of the loss on A): naive 0.635, replay 0.552
    # here; 30 steps a stage gave 0.773 and 0.650, 40 steps 0.837 and 0.783 (chance: 1/8)
    assert naive["R"][1][1] > 0.5 and replay["R"][1][1] > 0.3
    assert naive["summary"]["forgetting_max"] > 0.6                  # naive: A is gone
    assert replay["summary"]["forgetting_max"] < naive["summary"]["forgetting_max"] - 0.3
    assert replay["R"][1][0] > 0.5


@pytest.mark.slow
def test_multitask_stage_with_a_forgetting_guard(data, tmp_path):
    """Stage 2 trains B with A's loss at weight 0.5 under a zero budget on A: the first eval that
    loses any A accuracy stops the stage (patience 1), and the stage keeps its best in-budget
    weights, whose A score R records."""
    stage2 = "stages.1=" + json.dumps({"tasks": {"B": 1.0, "A": 0.5}, "steps": 6,
                                        "guard": {"task": "A", "max_drop": 0.0, "patience": 1}})
    result = tenure("train", CONFIG, *staged_args(tmp_path, data, 2, 6, "heads=per_task", "train.eval_every=2"),
                    stage2)
    assert "losses task/B, task/A" in result.stdout
    rec = record(tmp_path)
    start_a = next(c for c in rec["curves"] if c["step"] == 6)["scores"]["A"]
    evals = [c for c in rec["curves"] if c["stage"] == 1]
    within = [c for c in evals if c["scores"]["A"] >= start_a]
    out = [c for c in evals if c["scores"]["A"] < start_a]
    if out:  # stopped at the first eval out of budget
        assert "out of budget" in result.stdout and evals[-1] is out[0]
    if within:
        kept = max(within, key=lambda c: (c["scores"]["B"] + c["scores"]["A"]) / 2)  # the stage's score
        assert f"guard: keeping step {kept['step']}" in result.stdout
    else:
        assert "no eval stayed within the budget" in result.stdout



@pytest.mark.slow
def test_a_guarded_stage_resumes_to_the_pick_an_unbroken_run_keeps(data, tmp_path):
    """Stage B under a budget on A's validation loss (+0.05 over its value at the stage start), task-IL,
    checkpoint.keep=2. The guard's pick stays on disk although newer steps push it out of `keep`; a run
    killed after the pick resumes with the stage's start values and earlier evals (not re-measured at
    the resume step, which moved the budget and the pick) and ends on the same pick, R and weights; a
    rerun of the finished run takes R's last row from the pick again (it took the last weights)."""
    stage2 = "stages.1=" + json.dumps({"tasks": ["B"], "steps": 16,
                                        "guard": {"task": "A", "max_drop": 0.05, "patience": 100}})
    args = [*staged_args(tmp_path, data, 2, 6, "train.eval_every=2", "checkpoint.keep=2", "optim.lr=3e-3",
                         "heads=per_task", "tasks.A.metric=loss"), stage2]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = tenure("train", CONFIG, *args, f"run_dir={straight}")
    kept = re.search(r"guard: keeping step (\d+)", result.stdout)
    curves = record(straight)["curves"]
    start = next(c for c in curves if c["step"] == 6)["scores"]["A"]  # the end of stage A
    within = [c for c in curves if c["stage"] == 1 and c["scores"]["A"] <= start + 0.05]
    assert within and int(kept[1]) == max(within, key=lambda c: c["scores"]["B"])["step"] < 16
    pick = next(c for c in curves if c["step"] == int(kept[1]))  # a study selects on the pick's validation row
    assert record(straight)["R_validation"][1] == [pick["scores"]["A"], pick["scores"]["B"]]
    # the run's result is the pick: `tenure eval` / `export` default to the step summary.json names
    assert json.loads((straight / "summary.json").read_text())["best_step"] == int(kept[1])
    assert (straight / "checkpoints" / kept[1]).is_dir()  # pinned: keep=2 alone keeps 20 and 22
    assert sorted(int(p.name) for p in (straight / "checkpoints").iterdir() if p.name.isdigit()) == [int(kept[1]), 20, 22]
    proc = subprocess.Popen([sys.executable, "-m", "tenure.engine.cli", "train", str(CONFIG), *args,
                             f"run_dir={killed}"], cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "16").is_dir():  # after the pick, before the stage's end
        assert proc.poll() is None and time.time() < deadline, "run ended before step 16"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 16 <= max(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit()) < 22
    resumed = tenure("train", CONFIG, *args, f"run_dir={killed}")
    assert "resumed from step" in resumed.stdout and kept[0] in resumed.stdout
    assert record(killed)["R"] == record(straight)["R"] and weights(killed) == weights(straight)
    rerun = tenure("train", CONFIG, *args, f"run_dir={straight}")
    assert "resumed from step 22" in rerun.stdout and kept[0] in rerun.stdout
    assert record(straight)["R"] == record(killed)["R"]

# ----------------------------------------------------------------------------- evaluation-only probes

def probe_args(run_dir, data, retrieval, *extra):
    """configs/forgetting/pretrained_embeddings.yaml on the tiny BERT: train a lexname classifier,
    score an embedding task no stage trains (its own head on the same backbone)."""
    return ["train", ROOT / "configs/forgetting/pretrained_embeddings.yaml", f"model.path={TINY_BERT}",
            f"run_dir={run_dir}", "logging.progress=false", "stages.0.steps=4", "train.eval_every=4",
            "optim.lr=1e-3", "ewc.examples=16",
            *[f"tasks.lexnames.data.{split}={data[split]}" for split in ("train", "test")],
            *[f"tasks.embeddings.data.{split}={retrieval[split]}" for split in ("train", "test")], *extra]


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    d = tmp_path_factory.mktemp("retrieval")
    out = {}
    for split, rows in (("train", 200), ("test", 100)):
        out[split] = d / f"{split}.jsonl"
        out[split].write_text("".join(itertools.islice(open(ROOT / f"data/wordnet_retrieval/{split}.jsonl"), rows)))
    return out


def probe_scores(run_dir) -> tuple[dict, dict]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["baseline"], summary["final"]


@pytest.mark.slow
def test_probe_scores_the_backbone_as_an_embedding_run_would(data, retrieval, tmp_path):
    """The probe's start and end scores equal those of single-task embedding runs on the
    pretrained model and on the fine-tuned export; head-only tuning leaves them bit-identical."""
    tenure(*probe_args(tmp_path / "full", data, retrieval))
    tenure(*probe_args(tmp_path / "head", data, retrieval, "trainable.mode=head"))
    start, end = probe_scores(tmp_path / "full")
    assert start["test/lexnames/loss"] != end["test/lexnames/loss"]  # the 4 steps trained (accuracy may tie)
    assert start["test/embeddings/ndcg@10"] != end["test/embeddings/ndcg@10"]

    def embedding_baseline(model_path, run_dir):
        tenure("train", ROOT / "configs/tasks/embedding.yaml", f"model.path={model_path}", f"run_dir={run_dir}",
               "logging.progress=false", "train.steps=1", f"data.train={retrieval['train']}",
               f"data.test={retrieval['test']}", "data.validation=null", "data.max_length=32")
        return probe_scores(run_dir)[0]

    for model_path, want in ((TINY_BERT, start), (tmp_path / "full/hf", end)):
        got = embedding_baseline(model_path, tmp_path / f"single-{len(str(model_path))}")
        for metric in ("ndcg@10", "mrr", "recall@1"):
            assert got[f"test/{metric}"] == pytest.approx(want[f"test/embeddings/{metric}"], abs=1e-6)
    head_start, head_end = probe_scores(tmp_path / "head")
    assert head_start["test/embeddings/ndcg@10"] == start["test/embeddings/ndcg@10"]
    assert {k: v for k, v in head_end.items() if "embeddings" in k} == \
        {k: v for k, v in head_start.items() if "embeddings" in k}
    assert head_end["test/lexnames/accuracy"] != head_start["test/lexnames/accuracy"]


def test_probe_kinds_must_have_a_parameter_free_head(tmp_path):
    """A token-labelling task trained in no stage would be scored with an untrained head: refused."""
    result = tenure("train", ROOT / "configs/forgetting/pretrained_embeddings.yaml", f"model.path={TINY_BERT}",
                    f"run_dir={tmp_path}", "tasks.embeddings.kind=token_cls",
                    "tasks.embeddings.data.train=data/wordnet_ner/train.jsonl",
                    "tasks.embeddings.data.test=data/wordnet_ner/test.jsonl", "tasks.embeddings.metric=f1", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "tasks.embeddings: an evaluation-only task with a head other than the trained 'seq_cls'" in result.stderr


def test_online_ewc_keeps_the_accumulated_fisher_through_a_stage_without_ewc():
    """Stages A B C D with online EWC (gamma 0.5) and EWC off in stage C: C carries the Fisher
    accumulated so far (no penalty), and D adds its new Fisher to 0.5 x that one, not to nothing.
    (The extra is built without models here: a new Fisher is then zeros of the right shape.)"""
    import types

    import jax.numpy as jnp

    from tenure.engine.continual.stage_regularizers import regularizers

    cfg = load_config(ROOT / "configs/forgetting/split_lexnames.yaml",
                      ["ewc.gamma=0.5", "stages.1.ewc={lambda: 10}", "stages.3.ewc={lambda: 10}"])
    _, stages = resolve(cfg)
    params = {"backbone": {"w": jnp.ones((3, 2))}, "head": {"k": jnp.ones(2)}}
    trainability = types.SimpleNamespace(trainable_mask={"backbone": {"w": True}, "head": {"k": True}})
    accumulated = {"backbone": {"w": jnp.arange(6.0).reshape(3, 2)}, "head": {"k": jnp.array([2.0, 3.0])}}
    after_b = {"ewc": {"fisher": accumulated, "anchor": params}}

    def extra_of(index, previous):
        return regularizers(cfg, stages, index, None, None, trainability, params, None, params, previous)

    losses_c, extra_c = extra_of(2, after_b)
    assert "ewc" not in losses_c and set(extra_c["ewc"]) == {"fisher"}
    assert extra_c["ewc"]["fisher"] is accumulated
    losses_d, extra_d = extra_of(3, extra_c)
    assert "ewc" in losses_d
    np.testing.assert_array_equal(np.asarray(extra_d["ewc"]["fisher"]["backbone"]["w"]),
                                  0.5 * np.arange(6.0).reshape(3, 2))
    np.testing.assert_array_equal(np.asarray(extra_d["ewc"]["fisher"]["head"]["k"]), [1.0, 1.5])


def test_joint_method_trains_every_task_so_far_in_equal_shares():
    """method: joint: stage k trains its task and the k earlier ones in equal shares of the batch
    (replay of all of them at ratio k / (k + 1), whole training sets) under one mean; a replay
    section besides it is refused."""
    from tenure.engine.train.build import RunTask, Tasks, stage_losses
    from tenure.engine.config.stages import replayed_tasks

    cfg = load_config(ROOT / "configs/forgetting/split_lexnames.yaml", ["method=joint"])
    tasks, stages = resolve(cfg)
    assert [s.replay.ratio for s in stages] == [0.0, 0.5, 2 / 3, 0.75]
    assert [s.replay.buffer for s in stages] == [None] * 4 and [s.name for s in stages] == ["A", "B", "C", "D"]
    assert replayed_tasks(stages[3]) == ["A", "B", "C"]
    # the data shares (tenure.engine.train.build.stage_iterator): each task (1 - r) / 1 = r / 3 = 1/4 of the batch
    r = stages[3].replay.ratio
    assert (1 - r) == pytest.approx(r / 3)
    run_tasks = Tasks({name: RunTask(task, i, None, {}) for i, (name, task) in enumerate(tasks.items())},
                      "classification", None, True)
    assert list(stage_losses(run_tasks, stages[3])) == ["task"]
    assert list(stage_losses(run_tasks, stages[0])) == ["task/A"]
    with pytest.raises(TenureError, match=r"'stages.0.replay': method joint trains every earlier task"):
        load_config(ROOT / "configs/forgetting/split_lexnames.yaml", ["method=joint", "replay.ratio=0.25"])


def test_replay_tasks_names_general_data_no_stage_trains():
    """replay.tasks: a single-stage LLM fine-tune mixes general text (a task no stage trains) into
    its batches; the replayed task must have data and must not be the stage's own."""
    from tenure.engine.config.stages import replayed_tasks

    smol = ROOT / "configs/forgetting/smollm2_sft.yaml"
    tasks, stages = resolve(load_config(smol, ["replay.ratio=0.25", "replay.tasks=[general]"]))
    assert replayed_tasks(stages[0]) == ["general"] and stages[0].earlier == ()
    assert replayed_tasks(resolve(load_config(smol, ["replay.tasks=[general]"]))[1][0]) == []  # ratio 0: off
    _, stages = resolve(load_config(ROOT / "configs/forgetting/split_lexnames.yaml", ["replay.ratio=0.2"]))
    assert replayed_tasks(stages[2]) == ["A", "B"]           # default: every earlier task
    for name, why in (("capitals", "an lm_eval probe (no training data)"), ("definitions", "trained by this stage"),
                      ("nope", "not a task")):
        with pytest.raises(TenureError, match=rf"'stages.0.replay.tasks': '{name}' is {re.escape(why)}"):
            resolve(load_config(smol, ["replay.ratio=0.25", f"replay.tasks=[{name}]"]))


@pytest.mark.slow
def test_baseline_cache_shares_the_starting_scores_between_runs(naive_run, data, tmp_path):
    """eval.baseline_cache: the first run computes the start row and stores it; a run from the same
    weights with the same task settings (another lr) reads it back; the scores equal those of a run
    without the cache. The key follows the weights and the task settings, not the optimizer."""
    from tenure.engine.tasks import baseline_cache

    run_dir, _ = naive_run
    cache = tmp_path / "cache"
    first = train(tmp_path / "first", data, f"eval.baseline_cache={cache}")
    second = train(tmp_path / "second", data, f"eval.baseline_cache={cache}", "optim.lr=5e-4")
    assert "baseline: from" not in first.stdout and f"baseline: from {cache}" in second.stdout
    assert len(list(cache.glob("*.json"))) == 1
    want = json.loads((run_dir / "summary.json").read_text())["baseline"]
    for run in ("first", "second"):
        assert json.loads((tmp_path / run / "summary.json").read_text())["baseline"] == want
        assert record(tmp_path / run)["start_row"] == record(run_dir)["start_row"]
    cfg, masks = load_config(CONFIG, staged_args(run_dir, data)), ((True, False), (False, True))
    same = baseline_cache.key(load_config(CONFIG, staged_args(run_dir, data, 2, 6, "optim.lr=5e-4")), "w", masks)
    assert baseline_cache.key(cfg, "w", masks) == same != baseline_cache.key(cfg, "v", masks)
    assert baseline_cache.key(load_config(CONFIG, staged_args(run_dir, data, 2, 6, "tasks.A.data.eval_batch_size=16")),
                              "w", masks) != same
    # The same weights under per-task heads score B with its own classifier (shared: with stage A's
    # labels only, B at 0): another key (it served the shared heads' start row, B 0.0 for 0.42).
    per_task = train(tmp_path / "per_task", data, f"eval.baseline_cache={cache}", "heads=per_task",
                     "stages.0.steps=1", "stages.1.steps=1")
    assert "baseline: from" not in per_task.stdout and len(list(cache.glob("*.json"))) == 2
    assert record(tmp_path / "per_task")["start_row"][1] > 0 == record(run_dir)["start_row"][1]


@pytest.mark.slow
def test_kl_to_start_is_measured_on_the_eval_cadence(naive_run, data, tmp_path):
    """eval.kl_to_start: every eval after the start carries each trained task's KL to the starting
    model on its own validation inputs; at lr 1e-12 the weights barely move and it is 0 to float
    precision, at the run's lr it is clearly above 0, and forgetting.json keeps its value at each stage's last eval."""
    moved, still = naive_run[0], tmp_path / "still"
    train(still, data, "eval.kl_to_start=true", "optim.lr=1e-12")
    for run_dir in (moved, still):
        rec = record(run_dir)
        assert [sorted(c.get("kl_start", {})) for c in rec["curves"]] == [[], ["A"], ["A"], ["B"], ["B"]]
        assert rec["kl_to_start"] == [rec["curves"][2]["kl_start"], rec["curves"][4]["kl_start"]]
    kl = [v for c in record(moved)["curves"][1:] for v in c["kl_start"].values()]
    assert all(abs(v) < 1e-6 for c in record(still)["curves"][1:] for v in c["kl_start"].values())
    assert all(v > 1e-3 for v in kl), kl   # (not monotone: here A's 0.060 at step 3, 0.0028 at step 6)
    # beside it, the backbone's distance to the start: the exported weights' distance to the pretrained ones
    rec = record(moved)
    assert rec["weight_distance"] == [rec["curves"][2]["weight_distance"], rec["curves"][4]["weight_distance"]]
    assert all(c["weight_distance"] < 1e-6 for c in record(still)["curves"][1:])
    end, start = (load_file(str(d / "model.safetensors")) for d in (moved / "hf", TINY_BERT))
    # tenure's backbone is the encoder and embeddings: the pooler belongs to the [CLS] head
    shared = [k for k in start if k in end and not k.startswith(("classifier", "cls.", "bert.pooler"))]
    expected = math.sqrt(sum(float(np.sum((end[k].astype(np.float64) - start[k]) ** 2)) for k in shared))
    assert len(shared) > 10 and rec["weight_distance"][-1] == pytest.approx(expected, rel=1e-4)


def test_a_replaying_stage_keeps_source_weights_and_the_longest_max_length(data, tmp_path):
    """Stage B replays task A, whose two sources weigh 3:1 and whose examples run to 40 tokens while
    B's max_length is 20: A's half of each batch splits 3:1 between them (the sources' weights were
    dropped: 1:1, and A's share doubled), and the batches widen to 40 (was a ValueError mid-stage)."""
    from tenure.engine.train.build import build_backbone, build_tasks, stage_iterator

    rows = [json.loads(line) for line in data["train"].read_text().splitlines()]
    sources = {}
    for name, label in (("x", "noun.animal"), ("y", "noun.plant")):
        path = tmp_path / f"{name}.jsonl"
        # glosses lengthened past B's 20 tokens: A keeps up to its own max_length 40
        path.write_text("".join(json.dumps({**r, "text": f"{r['text']} {r['text']} {r['text']}"}) + "\n"
                                for r in rows if r["label"] == label))
        sources[name] = {"path": str(path), "weight": 3 if name == "x" else 1}
    cfg = load_config(CONFIG, [*staged_args(tmp_path, data), "tasks.A.data.train=" + json.dumps(sources),
                               "tasks.A.data.max_length=40", "tasks.B.data.max_length=20", "tasks.A.data.pack=false", "tasks.B.data.pack=false",
                               "replay.ratio=0.5"])
    tasks, stages = resolve(cfg)
    backbone = build_backbone(cfg, weights=False)
    run_tasks = build_tasks(cfg, backbone, tasks, list(tasks))
    it, buffers = stage_iterator(backbone, run_tasks, stages[1], seed=0, buffer_key="replay.buffer")
    assert set(buffers) == {"A/x", "A/y"}  # each source's buffer (one key "A" kept only y's)
    labels, widths = [], set()
    for _ in range(40):  # 320 examples: interleave shares B 4, A/x 3, A/y 1 of every 8
        batch = next(it)
        widths.add(batch["input_ids"].shape[1])
        labels += [run_tasks.label_vocab.labels[int(k)] for k, t in zip(batch["labels"], batch["task_id"]) if t == 0]
    it.close()
    assert (labels.count("noun.animal"), labels.count("noun.plant"), len(labels)) == (120, 40, 160)
    assert max(widths) == 40


def test_a_run_has_one_set_of_lora_adapters():
    """The adapters are made with the first stage's rank, alpha and targets, and R's evals and the
    export apply those: a later stage with others, or without LoRA, is refused, not half applied."""
    lora = "trainable={mode: lora, lora: {rank: 8, alpha: 16, targets: [query, value]}}"
    for override, key, why in (
            ("stages.1.trainable={mode: lora, lora: {rank: 4, alpha: 16, targets: [query, value]}}",
             "stages.1.trainable.lora.rank", "4 differs from the first stage's 8"),
            ("stages.1.trainable={mode: lora, lora: {rank: 8, alpha: 32, targets: [query, value]}}",
             "stages.1.trainable.lora.alpha", "32.0 differs from the first stage's 16.0"),
            ("stages.1.trainable={mode: full}", "stages.1.trainable.mode", "full, while the first stage's is lora")):
        with pytest.raises(TenureError, match=rf"'{re.escape(key)}': {re.escape(why)}"):
            resolve(load_config(CONFIG, [lora, override]))
    with pytest.raises(TenureError, match=r"'stages.1.trainable.mode': lora, while the first stage's is full"):
        resolve(load_config(CONFIG, ["stages.1.trainable={mode: lora}"]))
    _, stages = resolve(load_config(CONFIG, [lora, "stages.1.trainable={mode: lora, lora: {rank: 8, alpha: 16, "
                                                   "targets: [query, value], dropout: 0.1}}"]))
    assert [s.trainable.lora.dropout for s in stages] == [0.0, 0.1]   # dropout may differ per stage
