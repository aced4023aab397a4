"""Padding into length buckets, and greedy LM packing: exact arrays, token preservation, resume."""
import json

import grain
import numpy as np
import pytest

from tenure.engine.data.packing import PackIterDataset, bucket_length, collate, pack_examples


def lm_example(ids):
    ids = np.asarray(ids, np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}


def test_bucket_length():
    assert [bucket_length(n, (4, 8, 16)) for n in (1, 4, 5, 16)] == [4, 4, 8, 16]
    with pytest.raises(ValueError, match="length 17 exceeds the largest bucket 16"):
        bucket_length(17, (4, 8, 16))


def test_collate_pads_to_bucket_and_rows():
    examples = [lm_example([5, 6, 7, 8, 9]), {**lm_example([5, 6]), "labels": np.asarray([-100, 6], np.int32)}]
    batch = collate(examples, (4, 8, 16), pad_id=1, rows=3)
    np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 7, 8, 9, 1, 1, 1], [5, 6, 1, 1, 1, 1, 1, 1], [1] * 8])
    np.testing.assert_array_equal(batch["attention_mask"], [[1] * 5 + [0] * 3, [1, 1] + [0] * 6, [0] * 8])
    np.testing.assert_array_equal(batch["labels"][1], [-100, 6] + [-100] * 6)
    np.testing.assert_array_equal(batch["labels"][2], [-100] * 8)
    np.testing.assert_array_equal(batch["example_mask"], [1.0, 1.0, 0.0])
    assert batch["example_mask"].dtype == np.float32 and batch["input_ids"].dtype == np.int32


def test_collate_scalar_labels_and_passages():
    examples = [{"query_input_ids": np.asarray([2, 5, 3], np.int32), "labels": np.asarray(1, np.int32),
                 "passage_input_ids": np.asarray([[2, 5, 6, 7, 8, 3], [2, 3, 0, 0, 0, 0]], np.int32)}]
    batch = collate(examples, (4, 8), rows=2)
    assert batch["query_input_ids"].shape == (2, 4) and batch["passage_input_ids"].shape == (2, 2, 8)
    np.testing.assert_array_equal(batch["labels"], [1, 0])
    np.testing.assert_array_equal(batch["passage_input_ids"][0, 0], [2, 5, 6, 7, 8, 3, 0, 0])


def test_pack_examples_exact_arrays():
    rows = pack_examples([lm_example([11, 12, 13]), lm_example([21, 22]), lm_example([31, 32, 33, 34]),
                          lm_example([41])], row_length=6, pad_id=0)
    assert len(rows) == 2
    np.testing.assert_array_equal(rows[0]["input_ids"], [11, 12, 13, 21, 22, 0])
    np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 0, 1, 0])
    np.testing.assert_array_equal(rows[0]["labels"], [-100, 12, 13, -100, 22, -100])
    np.testing.assert_array_equal(rows[0]["attention_mask"], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(rows[1]["input_ids"], [31, 32, 33, 34, 41, 0])
    np.testing.assert_array_equal(rows[1]["segment_ids"], [1, 1, 1, 1, 2, 0])
    np.testing.assert_array_equal(rows[1]["positions"], [0, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(rows[1]["labels"], [-100, 32, 33, 34, -100, -100])


def _shifted_targets(ids, labels, segments):
    """(context within the segment, target) pairs a causal loss scores: logits[t] vs labels[t+1]."""
    pairs = []
    for t in range(len(ids) - 1):
        if labels[t + 1] == -100:
            continue
        assert segments is None or segments[t] == segments[t + 1] != 0, "a target crosses a boundary"
        start = t
        while segments is not None and start > 0 and segments[start - 1] == segments[t]:
            start -= 1
        pairs.append((tuple(ids[start if segments is not None else 0:t + 1]), int(labels[t + 1])))
    return pairs


def test_packing_preserves_tokens_and_loss_targets():
    rng = np.random.default_rng(0)
    examples = [lm_example(rng.integers(3, 50, rng.integers(1, 9))) for _ in range(40)]
    rows = pack_examples(examples, row_length=16)
    unpacked = []
    for row in rows:
        for s in range(1, row["segment_ids"].max() + 1):
            unpacked.append(row["input_ids"][row["segment_ids"] == s])
        assert (row["attention_mask"] == (row["segment_ids"] > 0)).all()
    assert len(unpacked) == 40
    for got, ex in zip(unpacked, examples):
        np.testing.assert_array_equal(got, ex["input_ids"])
    packed_pairs = [p for r in rows for p in _shifted_targets(r["input_ids"], r["labels"], r["segment_ids"])]
    unpacked_pairs = [p for ex in examples for p in _shifted_targets(ex["input_ids"], ex["labels"], None)]
    assert packed_pairs == unpacked_pairs


def test_pack_iter_dataset_resumes_exactly():
    rng = np.random.default_rng(1)
    examples = [lm_example(rng.integers(3, 50, rng.integers(1, 7))) for _ in range(30)]
    ds = PackIterDataset(grain.MapDataset.source(examples).to_iter_dataset(), row_length=8)
    full = list(ds)
    expected = pack_examples(examples, row_length=8)
    assert len(full) == len(expected)
    for got, want in zip(full, expected):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["pending"] is not None  # an example pulled but not yet placed travels in the state
    fresh = iter(ds)
    fresh.set_state(state)
    rest = list(fresh)
    assert len(rest) == len(full) - 3
    for got, want in zip(rest, full[3:]):
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(got["segment_ids"], want["segment_ids"])


def test_packed_rows_carry_the_task_id_and_never_mix_tasks():
    """A staged run stamps `task_id` on every example: a packed row carries it (the loss picks the
    task's rows by it) and closes when the next example belongs to another task; the pending
    example keeps its task_id through a resume."""
    def tagged(ids, task):
        return {**lm_example(ids), "task_id": np.asarray(task, np.int32)}
    examples = [tagged([11, 12], 0), tagged([21, 22], 0), tagged([31], 1), tagged([41, 42], 1), tagged([51], 0)]
    rows = pack_examples(examples, row_length=8)
    assert [int(r["task_id"]) for r in rows] == [0, 1, 0]
    np.testing.assert_array_equal(rows[0]["input_ids"], [11, 12, 21, 22, 0, 0, 0, 0])
    np.testing.assert_array_equal(rows[1]["input_ids"], [31, 41, 42, 0, 0, 0, 0, 0])
    ds = PackIterDataset(grain.MapDataset.source(examples).to_iter_dataset(), row_length=8)
    it = iter(ds)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["pending"]["task_id"] == 1
    fresh = iter(ds)
    fresh.set_state(state)
    rest = list(fresh)
    assert [int(r["task_id"]) for r in rest] == [1, 0]
    batch = collate(rows, (8,))
    np.testing.assert_array_equal(batch["task_id"], [0, 1, 0])


@pytest.mark.slow
def test_packed_gpt2_forward_and_loss_equal_unpacked():
    gpt2 = pytest.importorskip("tenure.models.gpt2")
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    cfg = gpt2.GPT2Config(vocab_size=64, max_positions=32, hidden_size=16, num_layers=2, num_heads=2,
                          embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
    model = gpt2.GPT2Decoder(cfg)
    rng = np.random.default_rng(2)
    examples = [lm_example(rng.integers(3, 64, n)) for n in (5, 3, 7, 4)]
    rows = pack_examples(examples, row_length=16)
    assert [r["segment_ids"].max() for r in rows] == [3, 1]
    packed = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    params = nn.unbox(model.init(jax.random.key(0), packed["input_ids"], packed["attention_mask"])["params"])

    @jax.jit
    def logits_and_nll(batch):
        hidden = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                             segment_ids=batch.get("segment_ids"), positions=batch.get("positions"))
        logits = model.apply({"params": params}, hidden, method=model.attend)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        targets = batch["labels"][:, 1:]
        nll = -jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
        return logits, jnp.where(targets != -100, nll, 0.0)

    packed_logits, packed_nll = logits_and_nll(packed)
    # The same examples unpacked: one per row, right-padded.
    unpacked = {k: jnp.asarray(v) for k, v in collate(examples, (16,)).items() if k != "example_mask"}
    single_logits, single_nll = logits_and_nll(unpacked)
    flat_rows = [(r, s) for r in range(len(rows)) for s in range(1, rows[r]["segment_ids"].max() + 1)]
    for (r, s), ex, logits in zip(flat_rows, examples, single_logits):
        n = len(ex["input_ids"])
        np.testing.assert_allclose(packed_logits[r][rows[r]["segment_ids"] == s], logits[:n], atol=1e-5)
    np.testing.assert_allclose(packed_nll.sum(), single_nll.sum(), rtol=1e-5)
