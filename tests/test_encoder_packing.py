"""data.pack for kinds with one output per example (seq_cls, pair_cls, regression): the packed
batch's arrays, exact logits / loss / gradients against the same examples unpacked, the
pipeline (same examples per batch, resume), the config error, and `tenure train` end to end."""
import json
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from tenure.engine.train.assemble import abstract_batch
from tenure.engine.config.schema import validate
from tenure.engine.data.batch_packing import (first_fit_decreasing, global_rows, pack_batch, planned_rows,
                                              row_step)
from tenure.engine.data.config import DataConfig
from tenure.engine.data.packing import collate
from tenure.engine.data.pipeline import build_eval_batches, build_label_vocab, build_train_iterator
from tenure.engine.tasks.kinds import KINDS
from tenure.engine.train.optim import OptimConfig, build_optimizer, build_schedule
from tenure.engine.runtime.sharding import MESH_AXES, param_shardings, put_params
from tenure.engine.train.step import init_state, make_train_step
from tenure.engine.train.trainability import TrainableConfig, compile_trainability
from tenure.models.bert import BertConfig
from tenure.models.errors import TenureError
from tenure.models.gpt2 import GPT2Config
from tenure.models.tasks import build_task_model
from tests.test_data_pipeline import FIRST_WORD, labelled, word_tokenizer, write_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[1]
LENGTH = 16
TINY = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                  max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TINY_GPT2 = GPT2Config(vocab_size=60, max_positions=24, hidden_size=16, num_layers=2, num_heads=4,
                       embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)


def examples(n, seed=0, pair=False, regression=False, lengths=(3, 13)):
    """n featurised examples of random lengths ([CLS]=2 ... [SEP]=3), labels 0..2 (or floats)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        m = int(rng.integers(*lengths))
        ids = np.concatenate([[2], rng.integers(5, 60, m - 2), [3]]).astype(np.int32)
        ex = {"input_ids": ids, "attention_mask": np.ones(m, np.int32)}
        if pair:
            ex["token_type_ids"] = (np.arange(m) >= m // 2).astype(np.int32)
        ex["labels"] = np.asarray(rng.normal() if regression else k % 3, np.float32 if regression else np.int32)
        out.append(ex)
    return out


def check_packed(batch, exs, real=None):
    """Every real example once, intact at (row, start); segments, positions, scalars, padding."""
    real = len(exs) if real is None else real
    rows, seen = batch["input_ids"].shape[0], np.zeros(batch["input_ids"].shape, bool)
    for e, ex in enumerate(exs[:real]):
        r, s, n = batch["example_row"][e], batch["example_start"][e], len(ex["input_ids"])
        assert 0 <= r < rows and s + n <= LENGTH
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key in ex:
                np.testing.assert_array_equal(batch[key][r, s:s + n], ex[key])
        segment = batch["segment_ids"][r, s]
        assert segment >= 1 and (batch["segment_ids"][r, s:s + n] == segment).all()
        assert (batch["segment_ids"][r] == segment).sum() == n  # no other token shares its segment
        np.testing.assert_array_equal(batch["positions"][r, s:s + n], np.arange(n))
        assert not seen[r, s:s + n].any()
        seen[r, s:s + n] = True
        assert batch["labels"][e] == ex["labels"] and batch["example_mask"][e] == 1.0
    assert (batch["attention_mask"] == seen).all() and (batch["segment_ids"][~seen] == 0).all()
    assert (batch["input_ids"][~seen] == 0).all() and (batch["positions"][~seen] == 0).all()
    pad = slice(real, None)
    assert (batch["example_mask"][pad] == 0).all() and (batch["example_row"][pad] == 0).all()
    assert (batch["example_start"][pad] == 0).all()


def test_pack_batch_places_every_example_once():
    exs = examples(32)
    batch = pack_batch(exs, row_length=LENGTH, pad_id=0)
    check_packed(batch, exs)
    rows = batch["input_ids"].shape[0]
    needed = sum(len(ex["input_ids"]) for ex in exs) / LENGTH
    assert rows % row_step(32) == 0 and row_step(32) == 4 and needed <= rows < 32
    assert batch["input_ids"].shape == (rows, LENGTH) and batch["labels"].shape == (32,)
    assert {k: v.dtype for k, v in batch.items() if k.startswith("example_")} == {
        "example_row": np.int32, "example_start": np.int32, "example_mask": np.float32}
    np.testing.assert_array_equal(batch["labels"], [ex["labels"] for ex in exs])  # stream order kept
    # Padding rows (beyond those first-fit needs) are all pad.
    used = sorted(set(batch["example_row"].tolist()))
    assert used == list(range(len(used))) and not batch["attention_mask"][len(used):].any()


def test_planned_rows_cover_the_batches_a_run_draws():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, LENGTH + 1, size=400).tolist()
    planned = planned_rows([lengths], [1.0], examples=32, row_length=LENGTH)
    assert planned % row_step(32) == 0 and planned < 32  # packing still saves rows
    needed = np.array([len(first_fit_decreasing(rng.choice(lengths, 32).tolist(), LENGTH)) for _ in range(1000)])
    assert np.mean(needed <= planned) >= 0.98  # fresh batches fit the plan, as 99% of the drawn ones did
    assert np.mean(needed <= planned - row_step(32)) < 0.98  # and a smaller plan would not do
    # Two tasks that never share a row (sft's pack_rows) need more rows than one pool of both.
    short, long_ = [2] * 200, [LENGTH // 2 + 1] * 200
    apart = planned_rows([short, long_], [1, 1], examples=32, row_length=LENGTH, separate=True)
    assert apart > planned_rows([short, long_], [1, 1], examples=32, row_length=LENGTH)


def test_pack_batch_micro_batches_shards_padding_and_min_rows():
    exs = examples(16, seed=1, pair=True)
    batch = pack_batch(exs, row_length=LENGTH, accum=2, shards=2)
    check_packed(batch, exs)
    rows = batch["input_ids"].shape[0]
    assert rows % 4 == 0  # 2 micro-batches x a multiple of 2 shards
    assert all(batch["example_row"][e] % 2 == e % 2 for e in range(16))  # micro-batch j's rows are j mod 2
    partial = pack_batch(exs, row_length=LENGTH, slots=16, real=5)
    check_packed(partial, exs, real=5)
    bins = first_fit_decreasing([len(ex["input_ids"]) for ex in exs[:5]], LENGTH)
    assert sorted(i for b in bins for i in b) == list(range(5))
    assert partial["input_ids"].shape[0] == -(-len(bins) // row_step(16)) * row_step(16)
    empty = pack_batch(exs[:1], row_length=LENGTH, slots=8, real=0)
    assert empty["input_ids"].shape == (1, LENGTH) and not empty["example_mask"].any()
    assert pack_batch(exs, row_length=LENGTH, min_rows=16)["input_ids"].shape == (16, LENGTH)  # several processes
    assert pack_batch(exs, row_length=LENGTH, min_rows=rows + 1)["input_ids"].shape[0] == rows + row_step(16)
    with pytest.raises(TenureError, match="grad_accum_steps=3"):
        pack_batch(exs, row_length=LENGTH, accum=3)
    # A process holding global row blocks 1 and 3 of 4 rows each: local rows 0..7 -> 4..7, 12..15.
    np.testing.assert_array_equal(global_rows(np.arange(8), [1, 3], 4), [4, 5, 6, 7, 12, 13, 14, 15])


def _model_and_params(kind, pooling, arch=TINY, num_labels=3):
    model = build_task_model(arch, kind, num_labels=num_labels, pooling=pooling)
    sample = collate(examples(2, pair=kind == "pair_cls"), (LENGTH,))
    params = nn.unbox(model.init(jax.random.key(0), sample)["params"])
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)
    return model, params


CASES = [("seq_cls", "cls", TINY), ("seq_cls", "mean", TINY), ("seq_cls", "last", TINY),
         ("pair_cls", "cls", TINY), ("regression", "cls", TINY), ("regression", "mean", TINY),
         ("seq_cls", "last", TINY_GPT2)]


@pytest.mark.parametrize("kind,pooling,arch", CASES, ids=[f"{k}-{p}-{type(a).__name__}" for k, p, a in CASES])
def test_packed_logits_equal_unpacked(kind, pooling, arch):
    exs = examples(24, seed=2, pair=kind == "pair_cls", regression=kind == "regression")
    model, params = _model_and_params(kind, pooling, arch)
    if isinstance(arch, BertConfig):
        assert "pooler" in params["head"]  # "cls" goes through the BERT pooler
    unpacked = collate(exs, (LENGTH,), rows=26)  # two padding examples
    packed = pack_batch(exs, row_length=LENGTH, slots=26, real=24)
    assert packed["input_ids"].shape[0] < 24
    got = model.apply({"params": params}, packed)
    want = model.apply({"params": params}, unpacked)
    assert got["logits"].shape == want["logits"].shape == (26, 1 if kind == "regression" else 3)
    np.testing.assert_allclose(got["logits"][:24], want["logits"][:24], rtol=1e-5, atol=1e-5)
    if kind == "regression":
        np.testing.assert_allclose(got["predictions"][:24], want["predictions"][:24], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,pooling", [("seq_cls", "cls"), ("seq_cls", "mean"), ("pair_cls", "cls"),
                                          ("regression", "cls")])
def test_loss_and_gradients_equal_unpacked(kind, pooling):
    exs = examples(16, seed=3, pair=kind == "pair_cls", regression=kind == "regression")
    model, params = _model_and_params(kind, pooling)
    loss = KINDS[kind].loss()

    def loss_fn(p, batch):
        return loss(p, model.apply({"params": p}, batch, deterministic=False, logits=False), batch, {})[0]

    grad = jax.jit(jax.value_and_grad(loss_fn))
    want_loss, want_grads = grad(params, collate(exs, (LENGTH,)))
    got_loss, got_grads = grad(params, pack_batch(exs, row_length=LENGTH))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def _mesh(n):
    return Mesh(np.asarray(jax.devices()[:n]).reshape(n, 1, 1), MESH_AXES)


def train_steps(mesh, model, boxed, loss, num_layers, batches, accum_steps):
    """(params after one AdamW step per batch, each step's metrics) from the boxed init `boxed`."""
    params_np = jax.tree.map(np.asarray, nn.unbox(boxed))
    optim = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant")
    tr = compile_trainability(params_np, TrainableConfig(), num_layers)
    tx = build_optimizer(optim, tr, total_steps=10)
    shardings = param_shardings(boxed, mesh)
    state, state_shardings = init_state(put_params(params_np, shardings), tx, 0, mesh, shardings)
    step = make_train_step(model, {"task": loss}, tx, mesh, state_shardings, lr_schedule=build_schedule(optim, 10),
                           trainable_mask=tr.trainable_mask, accum_steps=accum_steps)
    history = []
    for batch in batches:
        state, metrics = step(state, batch)
        history.append(jax.tree.map(np.asarray, metrics))
    return jax.tree.map(np.asarray, state.params), history


def _train(mesh, batches, accum_steps, steps=2):
    model = build_task_model(TINY, "seq_cls", num_labels=3, pooling="cls")
    boxed = model.init(jax.random.key(0), collate(examples(2), (LENGTH,)))["params"]
    return train_steps(mesh, model, boxed, KINDS["seq_cls"].loss(), TINY.num_hidden_layers, batches[:steps],
                       accum_steps)


def test_train_step_packed_with_accumulation_on_two_devices_equals_unpacked():
    exs = [examples(16, seed=10 + i) for i in range(2)]
    want_params, want = _train(_mesh(1), [collate(e, (LENGTH,)) for e in exs], accum_steps=1)
    got_params, got = _train(_mesh(2), [pack_batch(e, row_length=LENGTH, accum=2, shards=2) for e in exs],
                             accum_steps=2)
    for w, g, ex in zip(want, got, exs):
        np.testing.assert_allclose(g["loss"], w["loss"], rtol=1e-5)
        np.testing.assert_allclose(g["grad_norm"], w["grad_norm"], rtol=1e-4)
        assert g["tokens"] == w["tokens"] == sum(len(x["input_ids"]) for x in ex)
    for g, w in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def _cfg(tmp_path, **overrides):
    lengths = lambda k: 1 + (k * 7) % 9  # noqa: E731
    values = dict(train=write_jsonl(tmp_path / "train.jsonl", labelled(40, lengths)),
                  validation=write_jsonl(tmp_path / "validation.jsonl", labelled(11, lengths)),
                  batch_size=8, eval_batch_size=4, max_length=12, length_buckets=[4, 8, 12], seed=3,
                  read_threads=1, prefetch=0)
    values.update(overrides)
    return DataConfig(**values)


def _ids(batch):
    """The record each real example holds (its first word after [CLS]), in example order."""
    return [int(batch["input_ids"][r, s + 1]) - FIRST_WORD
            for r, s, m in zip(batch["example_row"], batch["example_start"], batch["example_mask"]) if m]


def test_pipeline_packs_the_unpacked_batches_and_resumes(tmp_path):
    tok = word_tokenizer()
    plain_cfg, packed_cfg = _cfg(tmp_path), _cfg(tmp_path, pack=True)
    vocab = build_label_vocab(plain_cfg, "seq_cls")
    plain = build_train_iterator(plain_cfg, "seq_cls", tok, vocab)
    packed = build_train_iterator(packed_cfg, "seq_cls", tok, vocab)
    assert packed.num_batches == plain.num_batches
    expected = []
    for _ in range(9):  # past the end of the first epoch (5 batches); one row count: one compile
        p, q = next(plain), next(packed)
        ids = [int(i) - FIRST_WORD for i in p["input_ids"][:, 1]]
        assert _ids(q) == ids and q["labels"].tolist() == p["labels"].tolist()
        assert q["input_ids"].shape[1] == 12 and q["input_ids"].shape[0] <= 8
        assert q["attention_mask"].sum() == p["attention_mask"].sum()
        expected.append(q)
    assert len({q["input_ids"].shape for q in expected}) == 1
    assert json.dumps(packed.get_state()) == json.dumps(plain.get_state())  # the state means the same
    first = build_train_iterator(packed_cfg, "seq_cls", tok, vocab)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    resumed = build_train_iterator(packed_cfg, "seq_cls", tok, vocab)
    resumed.set_state(state)
    for want in expected[3:]:
        got = next(resumed)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    evals = list(build_eval_batches(packed_cfg, "validation", "seq_cls", tok, vocab))
    assert [len(b["labels"]) for b in evals] == [4, 4, 4] and sum(b["example_mask"].sum() for b in evals) == 11
    assert sorted(k for b in evals for k in _ids(b)) == list(range(11))
    assert all("example_row" in b and b["input_ids"].shape[1] == 12 for b in evals)


@pytest.mark.parametrize("kind", ["token_cls", "mlm", "embedding"])
def test_kinds_that_cannot_pack_give_one_line(kind):
    tree = {"model": {"path": "x"}, "task": {"kind": kind}, "data": {"train": "t.jsonl", "pack": True}}
    with pytest.raises(TenureError) as err:
        validate(tree)
    message = str(err.value)
    assert "\n" not in message and f"data.pack: task kind '{kind}' cannot pack" in message
    staged = {"model": {"path": "x"}, "tasks": {"a": {"kind": kind, "data": {"train": "t.jsonl", "pack": True}}},
              "stages": [{"tasks": ["a"], "steps": 1}]}
    with pytest.raises(TenureError, match=rf"tasks\.a\.data\.pack: task kind '{kind}'"):
        validate(staged)
    assert validate({**tree, "task": {"kind": "seq_cls"}}).data.pack


def test_abstract_batch_of_a_packed_encoder_kind():
    batch = abstract_batch("pair_cls", 8, 32, _mesh(1), packed=True)
    assert {k: v.shape for k, v in batch.items()} == {
        "input_ids": (8, 32), "attention_mask": (8, 32), "token_type_ids": (8, 32), "segment_ids": (8, 32),
        "positions": (8, 32), "example_mask": (8,), "labels": (8,), "example_row": (8,), "example_start": (8,)}
    assert "example_row" not in abstract_batch("causal_lm", 8, 32, _mesh(1), packed=True)


@pytest.mark.slow
def test_tenure_train_packed_equals_unpacked(tmp_path):
    from tests.cli_helpers import tenure
    data = {}
    for split, rows in (("train", 96), ("validation", 40), ("test", 40)):
        # Short glosses: 12-31 tokens with the fixture's small vocabulary, so rows of 40 hold several.
        lines = [line for line in open(ROOT / f"data/wordnet_lexnames/{split}.jsonl")
                 if len(json.loads(line)["text"]) <= 40][:rows]
        (tmp_path / f"{split}.jsonl").write_text("".join(lines))
        data[split] = tmp_path / f"{split}.jsonl"
    summaries = {}
    for pack in ("false", "true"):
        run_dir = tmp_path / f"pack_{pack}"
        overrides = [f"model.path={ROOT / 'tests/fixtures/bert/seq_cls'}", f"run_dir={run_dir}",
                     f"data.train={data['train']}", f"data.validation={data['validation']}",
                     f"data.test={data['test']}", "data.batch_size=16", "data.eval_batch_size=16",
                     "data.max_length=40", "data.group_by_length=0", f"data.pack={pack}", "model.dropout=0",
                     "train.steps=6", "train.eval_every=3", "train.log_every=1", "checkpoint.every_steps=100",
                     "optim.lr=1e-3", "logging.progress=false", "logging.tensorboard=false"]
        tenure("train", "configs/tasks/seq_cls.yaml", *overrides)
        summaries[pack] = json.loads((run_dir / "summary.json").read_text())
    # The packed run's config really packs its training and evaluation batches.
    from tenure.engine.config.schema import load_config
    from tenure.models.hf import load_tokenizer
    cfg = load_config(ROOT / "configs/tasks/seq_cls.yaml", overrides)
    tok = load_tokenizer(ROOT / "tests/fixtures/bert/seq_cls")
    vocab = build_label_vocab(cfg.data, "seq_cls")
    batch = next(build_train_iterator(cfg.data, "seq_cls", tok, vocab))
    assert "example_row" in batch and batch["segment_ids"].max() > 1  # rows hold several examples
    assert "example_row" in next(iter(build_eval_batches(cfg.data, "test", "seq_cls", tok, vocab)))
    plain, packed = summaries["false"], summaries["true"]
    np.testing.assert_allclose(packed["train_loss"], plain["train_loss"], rtol=1e-5, atol=1e-6)
    assert plain["final"].keys() == packed["final"].keys() and "test/accuracy" in plain["final"]
    for key, value in plain["final"].items():
        assert packed["final"][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


WORKER = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
port, pid, data_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import flax.linen as nn
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, "tests")
from test_data_pipeline import word_tokenizer
from tenure.engine.data.config import DataConfig
from tenure.engine.data.pipeline import build_eval_batches, build_label_vocab, build_train_iterator, to_global_batch
from tenure.models.bert import BertConfig
from tenure.models.tasks import build_task_model

common = dict(train=f"{data_dir}/train.jsonl", validation=f"{data_dir}/val.jsonl", batch_size=8, eval_batch_size=4,
              max_length=16, length_buckets=[4, 8, 16], shuffle=False, num_epochs=1, read_threads=1, prefetch=0)
tok = word_tokenizer()
mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
where = dict(process_index=jax.process_index(), process_count=2)
model = build_task_model(BertConfig(vocab_size=210, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=16), "seq_cls", num_labels=2)
first_ids = jax.jit(lambda b: b["input_ids"][b["example_row"], b["example_start"] + 1] - 5,
                    out_shardings=NamedSharding(mesh, P()))
logits = jax.jit(lambda p, b: model.apply({"params": p}, b)["logits"], out_shardings=NamedSharding(mesh, P()))
out, params = {}, None
for pack in (False, True):
    cfg = DataConfig(**common, pack=pack)
    vocab = build_label_vocab(cfg, "seq_cls")
    train = [to_global_batch(b, mesh) for b in build_train_iterator(cfg, "seq_cls", tok, vocab, batch_shards=2,
                                                                     **where)]
    evals = [to_global_batch(b, mesh) for b in build_eval_batches(cfg, "validation", "seq_cls", tok, vocab,
                                                                   batch_shards=2, **where)]
    if params is None:
        params = nn.unbox(jax.jit(model.init)(jax.random.key(0), train[0])["params"])
    ids = lambda b: (np.asarray(first_ids(b)) if pack else  # noqa: E731
                     multihost_utils.process_allgather(b["input_ids"], tiled=True)[:, 1] - 5).tolist()
    out[pack] = {"train": [ids(b) for b in train], "eval": [ids(b) for b in evals],
                 "shapes": [list(b["input_ids"].shape) for b in train + evals],
                 "logits": [np.asarray(logits(params, b)).tolist() for b in train + evals]}
print("RESULT " + json.dumps(out))
jax.distributed.shutdown()
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_pack_into_global_rows(tmp_path):
    from tests.cli_helpers import run_two_processes
    write_jsonl(tmp_path / "train.jsonl", [{"text": " ".join([f"w{k}"] + ["w199"] * (k % 5)),
                                            "label": "pos" if k % 2 else "neg"} for k in range(16)])
    write_jsonl(tmp_path / "val.jsonl", [{"text": f"w{k}", "label": "neg"} for k in range(7)])
    results = run_two_processes(WORKER, tmp_path)
    assert results[0] == results[1]
    plain, packed = results[0]["false"], results[0]["true"]
    # Every process packs its own 4 examples into a fixed 4 rows; example_row is made global.
    assert packed["train"] == plain["train"] == [[0, 2, 4, 6, 1, 3, 5, 7], [8, 10, 12, 14, 9, 11, 13, 15]]
    assert packed["eval"][0] == plain["eval"][0] == [0, 2, 1, 3]
    assert packed["eval"][1][:3] == plain["eval"][1][:3] == [4, 6, 5]
    assert packed["shapes"] == [[8, 16]] * 2 + [[4, 16]] * 2
    for got, want, real in zip(packed["logits"], plain["logits"], (8, 8, 4, 3)):  # the last eval example pads
        np.testing.assert_allclose(np.asarray(got)[:real], np.asarray(want)[:real], rtol=1e-5, atol=1e-5)
