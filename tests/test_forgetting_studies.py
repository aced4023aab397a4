"""The shipped forgetting studies (configs/forgetting/, docs/forgetting.md), reduced.

The slow test runs the Fisher-variants study (study 1's lexname tasks A then B, task-incremental,
the real MiniLM) for seed 0 on half the test split: naive against EWC with the exact Fisher and
with the batched one at two lambdas, and asserts the study's headline (EWC forgets clearly less
than naive; the batched Fisher needs a lambda about a batch larger); a second runs study 2b
(the embeddings MiniLM was made for, scored on its backbone while it learns lexnames) for full
fine-tuning, LoRA and the interpolated full fine-tune, and asserts its headline. The class-incremental ordering (replay forgets far less
than naive) is tested in tests/test_continual.py::test_minilm_class_incremental_replay_forgets_far_less.
"""
import json
import pathlib
import subprocess
import sys

import pytest
import yaml

from tests.cli_helpers import cli_env, study_records
from tenure.engine.study.aggregate import ForgettingRecord
from tenure.engine.study.config import load_study
from tenure.engine.study.plots import _mean_curve

ROOT = pathlib.Path(__file__).resolve().parents[1]
STUDY_DIR = ROOT / "configs/forgetting"
TASK_IL = STUDY_DIR / "split_lexnames_task_il.study.yaml"
FISHER_VARIANTS = STUDY_DIR / "fisher_variants.study.yaml"
CLASS_IL = STUDY_DIR / "split_lexnames_class_il.study.yaml"


def test_shipped_studies_load_and_differ_only_in_heads():
    """Both settings run the same methods with the same overrides, but for `heads`."""
    task_il, class_il = load_study(TASK_IL), load_study(CLASS_IL)
    assert task_il.base == class_il.base and task_il.seeds == class_il.seeds == 3
    assert list(task_il.methods) == list(class_il.methods) == ["naive", "ewc", "l2sp", "replay", "joint"]
    for method in task_il.methods:
        assert task_il.methods[method][0] == "heads=per_task" and class_il.methods[method][0] == "heads=shared"
        assert task_il.methods[method][1:] == class_il.methods[method][1:]


def test_curves_of_a_task_without_validation_split_come_from_R():
    """The engine's periodic evals use only the validation split; a task without one (the
    shipped study evaluates on test only) is plotted from its start score and R's rows."""
    record = ForgettingRecord.model_validate({
        "tasks": ["A", "B"], "stages": ["A", "B"], "metric": {"A": "accuracy", "B": "accuracy"},
        "direction": {"A": "max", "B": "max"}, "start_row": [0.25, 0.2], "R": [[0.9, 0.1], [0.6, 0.9]],
        "curves": [{"step": 0, "stage": 0, "scores": {"A": 0.25, "B": 0.2}},
                   {"step": 40, "stage": 0, "scores": {"A": None, "B": None}},
                   {"step": 80, "stage": 1, "scores": {"A": None, "B": None}}],
        "stage_ends": [40, 80]})
    steps, mean, _ = _mean_curve([record], "A")
    assert steps.tolist() == [0, 40, 80] and mean.tolist() == [0.25, 0.9, 0.6]


def _train(run_dir, overrides, config="split_lexnames.yaml"):
    result = subprocess.run([sys.executable, "-m", "tenure.engine.cli", "train", str(STUDY_DIR / config),
                             *overrides, f"run_dir={run_dir}", "train.seed=0", "logging.tensorboard=false"],
                            cwd=ROOT, env=cli_env(real_model=True), capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads((run_dir / "forgetting.json").read_text())


@pytest.fixture(scope="module")
def short_test(tmp_path_factory, head_rows):
    """The first half of lexnames' test split (800 glosses, 42 to 62 of each class) and the first
    200 of retrieval's 300 test queries: the studies' test scores at a third to half the cost."""
    d = tmp_path_factory.mktemp("short_test")
    return {"lexnames": head_rows("data/wordnet_lexnames/test.jsonl", 800, d / "lexnames.jsonl"),
            "retrieval": head_rows("data/wordnet_retrieval/test.jsonl", 200, d / "retrieval.jsonl")}


@pytest.mark.long
@pytest.mark.timeout(2400)  # MiniLM stage A, then four stage-B branches, two with a Fisher pass each
def test_minilm_fisher_variants_headline(tmp_path, short_test):
    """The Fisher-variants study (van de Ven 2025 on lexname tasks A, B, task-IL), seed 0, reduced
    to 64 Fisher examples and half the test split: naive loses part of A; EWC with the exact Fisher
    at the lambda the study chose on validation (1e5) keeps clearly more and still learns B; the
    batched Fisher (squared batch-mean gradient, here one batch of 64) at that lambda acts as
    almost no penalty, and at a lambda two decades larger keeps A (B then learns somewhat less:
    0.78 at seed 0 here, 0.86 in the study's mean)."""
    study = load_study(FISHER_VARIANTS)
    test = str(short_test["lexnames"])
    # R on test; no validation pass (the study chose lambda on it, the test asserts R only)
    reduced = [f"tasks.A.data.test={test}", f"tasks.B.data.test={test}", "ewc.examples=64",
               "tasks.A.data.validation=null", "tasks.B.data.validation=null", "logging.tensorboard=false"]
    by_dir = study_records(tmp_path, {
        "base": str(STUDY_DIR / study.base), "keep_checkpoints": False,
        "methods": {"naive": [*study.methods["naive"], *reduced],
                    "exact": [*study.methods["exact"], *reduced, "ewc.lambda=1e5"],
                    "batched": [*study.methods["batched"], *reduced]},
        "sweep": {"batched": {"ewc.lambda": [1.0e5, 1.0e7]}}})
    R = {name: by_dir[path]["R"] for name, path in (("naive", "naive/seed0"), ("exact 1e5", "exact/seed0"),
                                               ("batched 1e5", "batched/ewc.lambda-100000/seed0"),
                                               ("batched 1e7", "batched/ewc.lambda-1e7/seed0"))}
    assert len(by_dir) == 4
    assert all(r[0] == R["naive"][0] for r in R.values()) and R["naive"][0][0] > 0.8  # one stage A, which learns A
    # R has a row per stage and a column per task: A's forgetting is its accuracy after A minus after B.
    forgetting = {name: r[0][0] - r[1][0] for name, r in R.items()}
    learned_b = {name: r[1][1] for name, r in R.items()}
    assert forgetting["naive"] > 0.15 and learned_b["naive"] > 0.85, (forgetting, learned_b)
    assert forgetting["exact 1e5"] < forgetting["naive"] - MARGIN and learned_b["exact 1e5"] > 0.8, (forgetting, learned_b)
    assert forgetting["batched 1e5"] > forgetting["exact 1e5"] + MARGIN, forgetting      # ~ a batch too small
    assert forgetting["batched 1e7"] < forgetting["naive"] - MARGIN and learned_b["batched 1e7"] > 0.7, (
        forgetting, learned_b)


@pytest.mark.long
@pytest.mark.timeout(1800)  # two MiniLM runs at once, then one interpolation
def test_minilm_curves_headline_lora_and_wise_beat_full_fine_tuning(tmp_path, monkeypatch, short_test):
    """Study 2b's headline (docs/forgetting.md) through `tenure study --jobs 2`, seed 0, 60 of the
    study's 100 steps, two thirds of retrieval's test queries and half of lexnames': full
    fine-tuning at the base lr (1e-4) learns lexnames and costs the embeddings; LoRA at the lr
    validation chose for it (3e-3) learns at least as much and costs them far less (the two are
    not on one curve, unlike Biderman et al.); naive's run at theta(0.6), no training (WiSE-FT),
    keeps its accuracy and most of what it cost the embeddings."""
    import argparse

    from tenure.engine.study import add_study_parser, run_study

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    shipped = load_study(STUDY_DIR / "pretrained_embeddings_curves.study.yaml")
    assert shipped.sweep["lora"]["optim.lr"][-1] == 3.0e-3 and shipped.interpolate["wise"].of == "naive"
    # R on test; no validation pass (nothing is selected here: lora runs at the lr the study chose)
    common = [f"tasks.lexnames.data.test={short_test['lexnames']}",
              f"tasks.embeddings.data.test={short_test['retrieval']}", "tasks.lexnames.data.validation=null",
              "tasks.embeddings.data.validation=null", "eval.kl_to_start=false", "logging.tensorboard=false",
              "stages.0.steps=60"]
    study = tmp_path / "curves.study.yaml"
    study.write_text(yaml.safe_dump({
        "base": str(STUDY_DIR / shipped.base), "seeds": 1,
        "methods": {"naive": common, "lora": [*shipped.methods["lora"], *common, "optim.lr=3.0e-3"]},
        "interpolate": {"wise": {"of": "naive", "alphas": [0.6]}},
        "tradeoff": {"learning": "final/lexnames", "forgetting": "drop/embeddings", "levels": [0.6]}}))
    parser = argparse.ArgumentParser(prog="tenure")
    add_study_parser(parser.add_subparsers(dest="command"))
    assert run_study(parser.parse_args(["study", str(study), "--jobs", "2", "--out", str(tmp_path / "out")])) == 0
    (cell,) = json.loads((tmp_path / "out" / "study.json").read_text())["cells"]
    point = {row["method"]: (row["per_seed"]["final/lexnames"][0], row["per_seed"]["drop/embeddings"][0])
             for row in cell["rows"]}
    (naive_acc, naive_drop), (lora_acc, lora_drop), (wise_acc, wise_drop) = (point[m] for m in ("naive", "lora", "wise"))
    # 60 of the study's 100 steps; here (AVX2 Zen 3, fp32): naive 0.483 / 0.215, LoRA 0.711 / 0.048,
    # WiSE 0.493 / 0.048 (100 steps on a Xeon: 0.630 / 0.244, 0.760 / 0.089, 0.609 / 0.070)
    assert naive_acc > 0.4 and naive_drop > 0.15, point                  # study: 0.634, 0.280 (5 seeds); chance 1/16
    assert lora_acc >= naive_acc and lora_drop < naive_drop / 2, point    # study: 0.777, 0.097
    assert wise_acc > naive_acc - 0.05 and wise_drop < naive_drop / 2, point  # study: 0.634, 0.091


MARGIN = 0.1


DATA_VOLUME = STUDY_DIR / "data_volume.study.yaml"


@pytest.mark.long
@pytest.mark.timeout(1200)  # two MiniLM runs at once: ~85 s idle (2 x 30 s of startup and compile)
def test_minilm_fewer_examples_open_a_wider_train_validation_gap(tmp_path, monkeypatch, head_rows):
    """Study 4, reduced: its base run with 100 and with 1000 training examples, seed 0, 32 steps of
    16 tokens at twice the study's learning rate (so the gap opens within the budget), 256
    validation and test examples, through `tenure study --jobs 2`. With 100 examples the model
    fits its training batches far better than it does validation; with 1000 it does not yet, and
    it scores higher."""
    import argparse

    from tenure.engine.study import add_study_parser, run_study

    monkeypatch.chdir(ROOT)                       # the base config's data paths are relative to the repo
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the runs compile as `tenure study` does, not as tests do
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    val, test = (head_rows(f"data/wordnet_lexnames/{split}.jsonl", 256, tmp_path / f"{split}.jsonl")
                 for split in ("validation", "test"))
    overrides = [f"data.validation={val}", f"data.test={test}", "data.max_length=16", "train.steps=32",
                 "train.eval_every=16", "optim.lr=2e-4", "logging.tensorboard=false"]
    study = tmp_path / "volume.study.yaml"
    study.write_text(f"base: {STUDY_DIR / 'data_volume.yaml'}\nseeds: 1\nmethods:\n  full: {json.dumps(overrides)}\n"
                     "grid: {data.subset: [100, 1000]}\n")
    assert load_study(DATA_VOLUME).base == "data_volume.yaml"  # the base the shipped study runs
    parser = argparse.ArgumentParser(prog="tenure")
    add_study_parser(parser.add_subparsers(dest="command"))
    assert run_study(parser.parse_args(["study", str(study), "--jobs", "2", "--out", str(tmp_path / "out")])) == 0
    small, large = (t["rows"][0] for t in json.loads((tmp_path / "out" / "study.json").read_text())["cells"])
    assert small["per_seed"]["gap_last"][0] > large["per_seed"]["gap_last"][0] + GAP_MARGIN, (small, large)
    assert large["per_seed"]["test"][0] > small["per_seed"]["test"][0]


GAP_MARGIN = 0.1


DECODER_LM = STUDY_DIR / "decoder_lm.study.yaml"


def test_decoder_lm_study_from_scratch_model_and_methods():
    """Study 3's model directory has a config and a tokenizer but no weights (model.init: random
    reads none); every method changes only stage B (LoRA's stage A trains exactly the full model:
    everything but the still-zero adapters)."""
    from tenure.models.errors import TenureError
    from tenure.models.hf import load_hf

    arch, backbone, head, tokenizer = load_hf(STUDY_DIR / "tiny_gpt2", with_weights=False)
    assert (arch.num_layers, arch.hidden_size, arch.vocab_size) == (2, 128, len(tokenizer)) == (2, 128, 2048)
    assert backbone == {} and head is None
    with pytest.raises(TenureError, match="no model.safetensors"):
        load_hf(STUDY_DIR / "tiny_gpt2")
    study = load_study(DECODER_LM)
    assert study.seeds == 3 and list(study.methods) == ["naive", "replay", "ewc", "lora", "joint"]
    for method, overrides in study.methods.items():
        assert all(o.startswith("stages.1.") or (method == "lora" and o.startswith("stages.0.trainable="))
                   for o in overrides), method


def test_decoder_lm_perplexity_stage_tracking_and_a_stage_without_validation(tmp_path):
    """Study 3's shape in a few steps: stage A's own score is a perplexity (lower is better, so
    falling validation perplexity is improvement, not overfitting), and stage B, whose task has no
    validation split, still records A's validation curve at its evals instead of failing."""
    run_dir = tmp_path / "run"
    rec = _train(run_dir, ["stages.0.steps=6", "stages.1.steps=4", "train.eval_every=2", "tasks.B.metric=perplexity",
                           "tasks.B.generation_examples=0", "tasks.A.data.batch_size=8", "tasks.B.data.batch_size=8"],
                 config="decoder_lm.yaml")
    assert [c["step"] for c in rec["curves"] if c["scores"]["A"] is not None] == [0, 2, 4, 6, 8, 10]
    summary = json.loads((run_dir / "summary.json").read_text())
    stage_a = [e["validation/score"] for e in summary["evals"] if e["stage"] == 0]
    assert len(stage_a) == 3 and stage_a == sorted(stage_a, reverse=True)   # A's perplexity falls
    assert summary["overfit_warnings"] == []
    assert rec["direction"] == {"A": "min", "B": "min"} and rec["summary"]["forgetting_max"] == pytest.approx(
        rec["R"][1][0] - rec["R"][0][0])


@pytest.mark.long
@pytest.mark.timeout(900)  # one tiny-GPT-2 stage A, then two stage-B branches
def test_decoder_lm_replay_keeps_corpus_a_perplexity_lower_than_naive(tmp_path):
    """Study 3, reduced: seed 0, stage A of 200 steps from scratch with half the study's batch,
    stage B of 40 steps, B scored by its perplexity without decoding, no periodic evals; naive
    against replay (the study's ratio), branched from one stage A as the study does. Both learn A
    far below a random model's perplexity and learn B; naive loses part of A on B, replay keeps
    A's perplexity clearly lower (here: A 300 after A; 372 naive, 310 replay)."""
    study = load_study(DECODER_LM)
    reduced = ["tasks.A.data.batch_size=16", "stages.1.steps=40", "tasks.B.metric=perplexity",
               "tasks.B.generation_examples=0", "tasks.A.data.validation=null", "train.eval_every=1000",
               "logging.tensorboard=false"]
    runs = study_records(tmp_path, {"base": str(STUDY_DIR / study.base), "keep_checkpoints": False, "methods": {
        method: [*study.methods[method], *reduced] for method in ("naive", "replay")}})
    naive, replay = runs["naive/seed0"], runs["replay/seed0"]
    random_ppl, after_a = naive["start_row"][0], naive["R"][0][0]
    assert after_a < 0.2 * random_ppl                                  # A learned: under a fifth of random's
    assert replay["R"][0][0] == pytest.approx(after_a, rel=1e-6)       # the same stage A
    for run in (naive, replay):
        assert run["R"][1][1] < 0.85 * run["R"][0][1]                  # B learned (its perplexity falls)
    forgetting = naive["summary"]["forgetting_max"], replay["summary"]["forgetting_max"]
    assert forgetting[0] > DECODER_FORGETTING                          # naive: A's perplexity rises
    assert forgetting[1] < 0.5 * forgetting[0], forgetting
    assert replay["R"][1][0] < naive["R"][1][0] - DECODER_MARGIN, (replay["R"], naive["R"])


DECODER_FORGETTING = 20.0   # perplexity points (71.6 at seed 0)
DECODER_MARGIN = 20.0       # perplexity points (62 at seed 0)
