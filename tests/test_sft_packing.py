"""data.pack for sft (`batch_packing.pack_rows`): each batch's own examples in fewer rows, tasks of
a mixed batch in rows of their own; loss, gradients, eval sums and a train step with accumulation
on two devices equal the same examples unpacked, for RoPE, learned-position and sliding-window
decoders; the pipeline packs exactly the unpacked batches."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from tenure.engine.data.batch_packing import pack_rows
from tenure.engine.data.batch_spec import IGNORE
from tenure.engine.data.config import DataConfig
from tenure.engine.data.packing import collate
from tenure.engine.data.pipeline import build_eval_batches, build_train_iterator
from tenure.engine.tasks import losses
from tenure.engine.tasks.kinds import KINDS
from tenure.models.gpt2 import GPT2Config
from tenure.models.tasks import build_task_model
from tests.test_data_pipeline import write_jsonl
from tests.test_encoder_packing import _mesh, train_steps
from tests.test_generate import RANDOM

LENGTH = 16
ARCHS = {"llama": RANDOM["llama"], "gpt2": GPT2Config(vocab_size=61, max_positions=40, hidden_size=16, num_layers=2,
                                                       num_heads=2, embd_dropout=0.0, attn_dropout=0.0,
                                                       resid_dropout=0.0),
         "mistral_window": RANDOM["mistral_window"]}


def sft_examples(n, seed=0, tasks=(0,)):
    """n prompt + completion examples of 3..9 tokens, the prompt's (0-2 tokens) labels IGNORE, task ids cycling."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        m, prompt = int(rng.integers(3, 10)), int(rng.integers(0, 3))   # prompt 0: the first token labelled
        ids = rng.integers(1, 61, m).astype(np.int32)
        labels = np.where(np.arange(m) < prompt, IGNORE, ids).astype(np.int32)
        out.append({"input_ids": ids, "attention_mask": np.ones(m, np.int32), "labels": labels,
                    "task_id": np.asarray(tasks[k % len(tasks)], np.int32)})
    return out


def test_pack_rows_layout():
    exs = sft_examples(12, tasks=(0, 1))
    batch = pack_rows(exs, row_length=LENGTH, slots=16, real=12, accum=2, shards=2)
    rows = batch["input_ids"].shape[0]
    assert rows % 4 == 0 and rows < 12 and batch["example_mask"].shape == batch["task_id"].shape == (rows,)
    found = []
    for r in range(rows):
        segments = [s for s in np.unique(batch["segment_ids"][r]) if s]
        assert batch["example_mask"][r] == (1.0 if segments else 0.0)
        for s in segments:
            at = np.flatnonzero(batch["segment_ids"][r] == s)
            ids = batch["input_ids"][r, at]
            e = next(i for i, ex in enumerate(exs) if np.array_equal(ex["input_ids"], ids))
            found.append(e)
            assert batch["task_id"][r] == exs[e]["task_id"]        # a row holds one task's examples
            assert e % 2 == r % 2                                   # micro-batch j: examples and rows = j mod 2
            np.testing.assert_array_equal(batch["positions"][r, at], np.arange(len(at)))
            assert batch["labels"][r, at[0]] == IGNORE              # nothing predicts a segment's first token
            np.testing.assert_array_equal(batch["labels"][r, at[1:]], exs[e]["labels"][1:])
    assert sorted(found) == list(range(12))                         # every real example once, padding ones none


def _model_and_params(arch):
    """(model, boxed params, plain numpy params)."""
    model = build_task_model(ARCHS[arch], "causal_lm")
    boxed = model.init(jax.random.key(1), collate(sft_examples(2), (LENGTH,)))["params"]
    return model, boxed, jax.tree.map(np.asarray, nn.unbox(boxed))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_loss_gradients_and_eval_sums_equal_unpacked(arch):
    model, _, params = _model_and_params(arch)
    exs = sft_examples(16, seed=3, tasks=(0, 1))
    # the replay loss: one mean over both tasks' labelled tokens, per-row task masks
    loss = losses.one_mean({"a": (KINDS["sft"].loss(), 0, 1.0), "b": (KINDS["sft"].loss(), 1, 1.0)}, ("b",))

    def loss_fn(p, batch):
        value, aux = loss(p, model.apply({"params": p}, batch, deterministic=False, logits=False), batch, {})
        return value, aux["replay_share"]

    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    unpacked, packed = collate(exs, (LENGTH,)), pack_rows(exs, row_length=LENGTH)
    assert packed["input_ids"].size < 0.6 * unpacked["input_ids"].size
    (want, want_share), want_grads = grad(params, unpacked)
    (got, got_share), got_grads = grad(params, packed)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_share, want_share, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    kind = KINDS["sft"]
    score = lambda batch: kind.scores(  # noqa: E731
        {k: np.asarray(v) for k, v in kind.reduce(model.apply({"params": params}, batch), batch).items()
         if k != "mask"}, None)
    want_scores, got_scores = score(unpacked), score(packed)
    for key in want_scores:
        np.testing.assert_allclose(got_scores[key], want_scores[key], rtol=1e-5)


def _train(mesh, batches, accum_steps):
    model, boxed, _ = _model_and_params("llama")
    return train_steps(mesh, model, boxed, KINDS["sft"].loss(), 2, batches, accum_steps)


def test_train_step_packed_with_accumulation_on_two_devices_equals_unpacked():
    exs = [sft_examples(16, seed=20 + i) for i in range(2)]
    # token means per micro-batch (examples e with e % 2 == j, unpacked or packed), then averaged
    want_params, want = _train(_mesh(1), [collate(e, (LENGTH,)) for e in exs], accum_steps=2)
    got_params, got = _train(_mesh(2), [pack_rows(e, row_length=LENGTH, accum=2, shards=2) for e in exs],
                             accum_steps=2)
    for w, g, ex in zip(want, got, exs):
        np.testing.assert_allclose(g["loss"], w["loss"], rtol=1e-5)
        np.testing.assert_allclose(g["grad_norm"], w["grad_norm"], rtol=1e-4)
        assert g["tokens"] == w["tokens"] == sum(len(x["input_ids"]) for x in ex)
    for g, w in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_pipeline_packs_the_unpacked_batches(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[PAD]", "[EOS]", *words])}, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]")
    records = [{"prompt": " ".join(words[(k + j) % 40] for j in range(1 + k % 3)) + " ",
                "completion": " ".join(words[(2 * k + j) % 40] for j in range(1 + k % 5))} for k in range(40)]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    common = dict(train=path, validation=path, batch_size=8, eval_batch_size=8, max_length=LENGTH, num_epochs=1,
                  shuffle=True, seed=5, read_threads=1, prefetch=0)

    def batches(pack):
        return list(build_train_iterator(DataConfig(**common, pack=pack), "sft", tok, None))

    plain, packed = batches(False), batches(True)
    assert len(plain) == len(packed) == 5
    for p, q in zip(plain, packed):   # the same examples: the same labelled tokens, in fewer rows
        assert sorted(p["labels"][p["labels"] != IGNORE]) == sorted(q["labels"][q["labels"] != IGNORE])
        assert q["input_ids"].shape[0] < p["input_ids"].shape[0]
    evals = list(build_eval_batches(DataConfig(**common, pack=True), "validation", "sft", tok, None))
    assert sum(int(b["attention_mask"].sum()) for b in evals) == sum(int(b["attention_mask"].sum()) for b in
                                                                      build_eval_batches(DataConfig(**common),
                                                                                         "validation", "sft",
                                                                                         tok, None))
