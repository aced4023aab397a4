"""Values that used to pass but should not (issue 10, item 8), each refused in one line
before training, and `on_bad_record: skip` saying what it skipped."""

import numpy as np
import pytest

from tenure.engine.config.schema import load_config
from tenure.engine.data.config import DataConfig
from tenure.engine.data.inspect import inspect_data
from tenure.engine.data.pipeline import build_eval_batches, build_train_iterator, plan_total_steps
from tenure.engine.data.records import validate
from tenure.engine.data.sources import open_source
from tenure.engine.data.tokenize import Featurizer
from tenure.engine.tasks.kinds import KINDS
from tenure.models.errors import TenureError
from tenure.models.hf import load_hf
from tenure.models.positions import check_max_length
from tests.test_data_pipeline import labelled, word_tokenizer, write_jsonl

QUICKSTART = "configs/tasks/seq_cls.yaml"


def test_nan_and_infinity_regression_targets_name_file_and_line(tmp_path):
    path = tmp_path / "sts.jsonl"
    path.write_text('{"text": "a", "target": 1.5}\n{"text": "b", "target": NaN}\n')
    with pytest.raises(TenureError, match=f"^{path}:2: field 'target': expected a finite number, got nan$"):
        validate(open_source(str(path)), "text_target")
    path.write_text('{"text_a": "a", "text_b": "b", "label": 0.5}\n{"text_a": "a", "text_b": "b", "label": -Infinity}\n')
    with pytest.raises(TenureError, match=f"^{path}:2: field 'label': expected a finite number, got -inf$"):
        validate(open_source(str(path)), "pair")
    featurizer = Featurizer("regression", "text_label", word_tokenizer(), None, max_length=8)
    with pytest.raises(TenureError, match="^f.csv:3: field 'label': expected a finite number, got 'nan'$"):
        featurizer([{"text": "w1", "label": "nan", "location": "f.csv:3", "synthetic": False}])


@pytest.mark.parametrize("override, message", [
    ("train.steps=true", "config key 'train.steps': expected an integer, got a boolean (true)"),
    ("data.batch_size=false", "config key 'data.batch_size': expected an integer, got a boolean (false)"),
    ("optim.lr=inf", "config key 'optim.lr': expected a finite number, got inf"),
    ("optim.lr=.inf", "config key 'optim.lr': expected a finite number, got inf"),
    ("optim.weight_decay=.nan", "config key 'optim.weight_decay': Input should be greater than or equal to 0 (got nan)"),
    ("optim.betas=[0.9,1.0]", "config key 'optim.betas': each beta must lie in [0, 1) (got [0.9, 1.0])"),
    ("optim.betas=[-0.1,0.9]", "config key 'optim.betas': each beta must lie in [0, 1) (got [-0.1, 0.9])"),
])
def test_config_values_refused(override, message):
    with pytest.raises(TenureError) as err:
        load_config(QUICKSTART, [override])
    assert str(err.value) == f"{QUICKSTART}: {message}"


def _task_outputs(kind):
    """Per-example arrays as the evaluators collect them, for a small fake split."""
    rng = np.random.default_rng(0)
    if kind in ("seq_cls", "pair_cls"):
        return {"pred": np.array([0, 1, 1, 0]), "label": np.array([0, 1, 0, 0]), "nll": rng.random(4)}
    if kind == "token_cls":
        return {"pred": np.array([[1, 2, 0]]), "label": np.array([[1, 2, 0]])}
    if kind == "regression":
        return {"pred": rng.random(5), "label": rng.random(5)}
    if kind in ("mlm", "sft", "causal_lm"):
        return {"nll": rng.random(4), "count": np.ones(4), "correct": np.ones(4)}
    return {"query": rng.random((12, 4)), "passage": rng.random((12, 4))}


@pytest.mark.parametrize("kind", ["seq_cls", "pair_cls", "token_cls", "regression", "mlm", "causal_lm", "sft",
                                  "embedding"])
def test_metrics_for_kind_is_what_the_evaluator_reports(kind):
    reported = KINDS[kind].scores(_task_outputs(kind), ["O", "B-X", "I-X"])
    assert set(reported) == KINDS[kind].metric_names()


def test_eval_metric_the_task_cannot_produce():
    assert KINDS["seq_cls"].check_metric("accuracy", "max") is None
    assert KINDS["regression"].check_metric("accuracy") == (
        "eval.metric 'accuracy' is not reported by task kind 'regression'; choose one of mse, pearson, spearman")
    assert KINDS["sft"].check_metric("bleu") is not None and KINDS["sft"].check_metric("bleu", generation=True) is None
    assert KINDS["mlm"].check_metric("perplexity", "max") == (
        "eval.mode 'max' contradicts eval.metric 'perplexity', where lower is better")


def test_max_length_beyond_the_position_table():
    bert = load_hf("tests/fixtures/bert/seq_cls", with_tokenizer=False)[0]
    assert check_max_length(bert, 40) is None
    with pytest.raises(TenureError, match="^data.max_length 41 is longer than the 40 positions this bert model "
                                          r"has \(its position table\); set data.max_length <= 40$"):
        check_max_length(bert, 41)
    roberta = load_hf("tests/fixtures/bert/roberta_mlm", with_tokenizer=False)[0]  # positions start at pad + 1
    with pytest.raises(TenureError, match="longer than the 39 positions this roberta model"):
        check_max_length(roberta, roberta.max_position_embeddings)
    gpt2 = load_hf("tests/fixtures/gpt2", with_tokenizer=False)[0]
    with pytest.raises(TenureError, match="longer than the 64 positions this gpt2 model"):
        check_max_length(gpt2, 65)
    llama = load_hf("tests/fixtures/llama", with_tokenizer=False)[0]
    assert check_max_length(llama, 65).startswith("warning: data.max_length 65 is longer than the 64-token context")


def test_steps_and_epochs_that_do_not_fit(tmp_path):
    assert plan_total_steps(None, 2, 10) == 10 and plan_total_steps(7, 2, 10) == 7 and plan_total_steps(50, None, None) == 50
    with pytest.raises(TenureError, match=r"^config: train.steps=11 is more than the 10 batches that "
                                          r"data.num_epochs=2 gives; raise data.num_epochs"):
        plan_total_steps(11, 2, 10)
    with pytest.raises(TenureError, match=r"^config: data.pack with data.num_epochs needs train.steps"):
        plan_total_steps(None, 1, None)
    with pytest.raises(TenureError, match="^config: set train.steps or data.num_epochs$"):
        plan_total_steps(None, None, None)
    # The iterator itself: running out is a TenureError naming the step, not a bare StopIteration.
    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", labelled(8)), batch_size=4, max_length=8,
                     num_epochs=1, shuffle=False, read_threads=1)
    from tenure.engine.data.pipeline import build_label_vocab
    it = build_train_iterator(cfg, "seq_cls", word_tokenizer(), build_label_vocab(cfg, "seq_cls"))
    it.next_batch(1), it.next_batch(2)
    with pytest.raises(TenureError, match=r"^data.train: the training data ran out at step 3 \(data.num_epochs "
                                          r"passes, 2 batches\)"):
        it.next_batch(3)


def test_skipped_records_are_counted_per_split(tmp_path, capsys):
    records = labelled(10)
    records[3] = {"text": "w3"}
    records[5] = {"text": "  ", "label": "pos"}
    records[7] = {"label": "neg"}
    train = write_jsonl(tmp_path / "train.jsonl", records)
    validation = write_jsonl(tmp_path / "validation.jsonl", labelled(4) + [{"text": "w1", "label": "other"}])
    cfg = DataConfig(train=train, validation=validation, batch_size=2, max_length=8, on_bad_record="skip",
                     shuffle=False, read_threads=1)
    from tenure.engine.data.pipeline import build_label_vocab
    vocab = build_label_vocab(cfg, "seq_cls")
    capsys.readouterr()
    build_train_iterator(cfg, "seq_cls", word_tokenizer(), vocab)
    build_eval_batches(cfg, "validation", "seq_cls", word_tokenizer(), vocab)
    assert capsys.readouterr().out.splitlines() == [
        f"data: train skipped 3 of 10 records: 1 x field 'label': missing; 1 x field 'text': is empty; "
        f"1 x field 'text': missing (first: {train}:4: field 'label': missing)",
        f"data: validation skipped 1 of 5 records: 1 x field 'label': unknown label 'other' (known: 'neg', 'pos') "
        f"(first: {validation}:5: field 'label': unknown label 'other' (known: 'neg', 'pos'))",
    ]


def test_inspect_reports_regression_labels_as_numbers(tmp_path):
    pairs = [{"text_a": f"w{k}", "text_b": "w1", "label": k / 4} for k in range(8)]
    cfg = DataConfig(train=write_jsonl(tmp_path / "train.jsonl", pairs), format="pair",
                     validation=write_jsonl(tmp_path / "v.jsonl", [dict(p, label=p["label"] + 0.1) for p in pairs]),
                     max_length=8)
    report = inspect_data(cfg, "regression", word_tokenizer())
    assert "unknown label" not in report and "0 bad records" in report
    assert "  targets: min 0  mean 0.875  max 1.75  std 0.5728" in report.splitlines()


def test_every_kinds_default_metric_is_one_it_reports():
    for name, kind in KINDS.items():
        if name == "lm_eval":  # its metrics are the harness's tasks' own (tenure.engine.train.build.lm_eval_metric)
            continue
        assert kind.check_metric(kind.metric, kind.mode) is None, name
