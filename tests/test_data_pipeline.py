"""Train iterator (shards, epochs, buckets, exact resume), eval batches, global arrays."""
import json

import jax
import numpy as np
import pytest
from jax.sharding import AxisType
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tenure.engine.data.config import DataConfig
from tenure.engine.data.pipeline import build_eval_batches, build_label_vocab, build_train_iterator, to_global_batch
from tenure.models.errors import TenureError

N_WORDS = 200
FIRST_WORD = 5  # ids 0..4 are [PAD] [UNK] [CLS] [SEP] [MASK]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level BERT-style tokenizer over w0..w199 (id of wK = K + 5), with EOS for LM tasks."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{k}" for k in range(N_WORDS)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def labelled(n, length=lambda k: 1):
    """Record k: text "wk" followed by filler words to `length(k)` words; label pos/neg by parity."""
    return [{"text": " ".join([f"w{k}"] + ["w199"] * (length(k) - 1)), "label": "pos" if k % 2 else "neg"}
            for k in range(n)]


def record_ids(batch):
    """Which record each real row holds (the first word after [CLS])."""
    return [int(i) - FIRST_WORD for i, m in zip(batch["input_ids"][:, 1], batch["example_mask"]) if m]


def make_cfg(tmp_path, n=20, **overrides):
    train = write_jsonl(tmp_path / "train.jsonl", labelled(n))
    values = dict(train=train, batch_size=4, max_length=16, length_buckets=[4, 8, 16], shuffle=True, seed=1,
                  read_threads=2)
    values.update(overrides)
    return DataConfig(**values)


def test_config_defaults_and_errors():
    cfg = DataConfig(max_length=128)
    assert cfg.length_buckets == [32, 64, 128] and cfg.global_eval_batch_size == 32
    assert DataConfig(max_length=100, length_buckets=[16, 64]).length_buckets == [16, 64, 100]
    with pytest.raises(ValueError, match="length_buckets must lie in 1..max_length \\(16\\)"):
        DataConfig(max_length=16, length_buckets=[8, 32])
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        DataConfig(batchsize=3)
    cfg = DataConfig(train={"new": {"path": "a.jsonl", "weight": 5}, "replay": {"path": "b.jsonl"}})
    assert {k: s.weight for k, s in cfg.sources.items()} == {"new": 5.0, "replay": 1.0}


def test_epochs_cover_every_record_once_per_epoch(tmp_path):
    cfg = make_cfg(tmp_path, num_epochs=2)
    vocab = build_label_vocab(cfg, "seq_cls")
    assert vocab.labels == ("neg", "pos")
    it = build_train_iterator(cfg, "seq_cls", word_tokenizer(), vocab)
    assert (it.num_examples, it.num_batches) == (20, 10)
    peeked = it.peek()
    batches = list(it)
    assert len(batches) == 10
    _assert_batches_equal([peeked], batches[:1])
    assert set(batches[0]) == {"input_ids", "attention_mask", "labels", "example_mask"}
    assert batches[0]["input_ids"].shape == (4, 4) and batches[0]["labels"].dtype == np.int32
    seen = [k for b in batches for k in record_ids(b)]
    assert sorted(seen[:20]) == list(range(20)) and sorted(seen[20:]) == list(range(20))
    assert seen[:20] != seen[20:] and seen[:20] != list(range(20))  # shuffled, anew each epoch
    labels = [int(lab) for b in batches for lab in b["labels"]]
    assert labels == [k % 2 for k in seen]


def test_batches_pad_to_the_smallest_bucket(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", labelled(8, length=lambda k: 1 if k < 4 else 5))
    cfg = DataConfig(train=train, batch_size=4, max_length=16, length_buckets=[4, 8, 16], shuffle=False,
                     num_epochs=1, read_threads=1)
    widths = [b["input_ids"].shape[1] for b in build_train_iterator(cfg, "seq_cls", word_tokenizer(),
                                                                      build_label_vocab(cfg, "seq_cls"))]
    assert widths == [4, 8]  # 3 tokens -> bucket 4; 7 tokens -> bucket 8


def test_process_shards_are_disjoint_and_cover_the_data(tmp_path):
    cfg = make_cfg(tmp_path, n=21, num_epochs=1, shuffle=False)
    tok, vocab = word_tokenizer(), build_label_vocab(cfg, "seq_cls")
    shards = [[k for b in build_train_iterator(cfg, "seq_cls", tok, vocab, process_index=p, process_count=2)
               for k in record_ids(b)] for p in (0, 1)]
    # 21 records: the last is dropped so both processes get 10 (equal step counts).
    assert shards[0] == list(range(0, 20, 2)) and shards[1] == list(range(1, 20, 2))
    assert all(len(b["input_ids"]) == 2 for b in build_train_iterator(cfg, "seq_cls", tok, vocab, process_count=2))


def _assert_batches_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for key in w:
            assert np.array_equal(g[key], w[key]), key


def _resume_case(tmp_path, case):
    tok = word_tokenizer()
    if case.startswith("seq_cls"):
        cfg = make_cfg(tmp_path, group_by_length=2 if case == "seq_cls_grouped" else 0)
        return cfg, "seq_cls", build_label_vocab(cfg, "seq_cls"), tok
    texts = [{"text": " ".join(f"w{(k * 7 + j) % N_WORDS}" for j in range(1 + k % 6))} for k in range(30)]
    replay = [{"text": f"w{150 + k} w{160 + k}"} for k in range(5)]
    new, old = write_jsonl(tmp_path / "new.jsonl", texts), write_jsonl(tmp_path / "old.jsonl", replay)
    sources = {"new": {"path": new, "weight": 3}, "replay": {"path": old, "weight": 1}}
    if case == "mlm_random_mix":
        return DataConfig(train=sources, mix_mode="random", batch_size=4, max_length=16, read_threads=2), "mlm", None, tok
    return DataConfig(train=sources, pack=True, batch_size=2, max_length=12, read_threads=2), "causal_lm", None, tok


def _mixed_lengths(k):
    return 1 + (k * 7) % 12   # 3..14 tokens with [CLS]/[SEP]: buckets 4, 8, 16


def test_length_grouping_keeps_every_example_and_pads_less(tmp_path):
    """data.group_by_length: each epoch still holds every record once, with its own label; the
    batches pad to smaller buckets than plain shuffling; eval runs in length order, covering all."""
    records = labelled(48, length=_mixed_lengths)
    train = write_jsonl(tmp_path / "t.jsonl", records)
    common = dict(train=train, validation=train, batch_size=4, max_length=16, length_buckets=[4, 8, 16],
                  num_epochs=2, read_threads=1, seed=3)
    tok = word_tokenizer()
    padded = {}
    for window in (0, 6):
        cfg = DataConfig(**common, group_by_length=window)
        batches = list(build_train_iterator(cfg, "seq_cls", tok, build_label_vocab(cfg, "seq_cls")))
        seen = [k for b in batches for k in record_ids(b)]
        assert len(batches) == 24 and sorted(seen[:48]) == sorted(seen[48:]) == list(range(48))
        assert [int(lab) for b in batches for lab in b["labels"]] == [k % 2 for k in seen]
        padded[window] = sum(b["input_ids"].size for b in batches)
        if window:   # within a batch, lengths come from one sorted run: spread at most a window's
            lengths = [[_mixed_lengths(k) for k in record_ids(b)] for b in batches]
            assert np.mean([max(ls) - min(ls) for ls in lengths]) < 4
            assert [record_ids(b) for b in batches[:6]] != sorted([record_ids(b) for b in batches[:6]])
    assert padded[6] < 0.8 * padded[0], padded   # here 1152 vs 1504 (1088 if sorted globally)
    evals = list(build_eval_batches(DataConfig(**common, group_by_length=6), "validation", "seq_cls", tok,
                                    build_label_vocab(DataConfig(**common), "seq_cls")))
    order = [k for b in evals for k in record_ids(b)]
    assert sorted(order) == list(range(48))
    assert [_mixed_lengths(k) for k in order] == sorted(_mixed_lengths(k) for k in range(48))
    with pytest.raises(ValueError, match="pack and group_by_length"):
        DataConfig(pack=True, group_by_length=4)


def test_eval_length_buckets_pad_evaluation_tightly_and_leave_training_alone(tmp_path):
    """data.eval_length_buckets: validation runs in length order at its own widths (here 4 and 8
    instead of one width of 16), every example once with its label; training batches keep
    length_buckets' single width."""
    records = labelled(48, length=_mixed_lengths)
    train = write_jsonl(tmp_path / "t.jsonl", records)
    common = dict(train=train, validation=train, batch_size=4, max_length=16, length_buckets=[16],
                  num_epochs=1, read_threads=1, seed=3)
    tok = word_tokenizer()
    cfg = DataConfig(**common, eval_length_buckets=[4, 8])
    assert cfg.eval_length_buckets == [4, 8, 16] and DataConfig(**common).eval_length_buckets is None
    vocab = build_label_vocab(cfg, "seq_cls")
    assert {b["input_ids"].shape[1] for b in build_train_iterator(cfg, "seq_cls", tok, vocab)} == {16}
    tight = list(build_eval_batches(cfg, "validation", "seq_cls", tok, vocab))
    plain = list(build_eval_batches(DataConfig(**common), "validation", "seq_cls", tok, vocab))
    order = [k for b in tight for k in record_ids(b)]
    assert sorted(order) == list(range(48))
    assert [_mixed_lengths(k) for k in order] == sorted(_mixed_lengths(k) for k in range(48))
    assert [int(lab) for b in tight for lab in b["labels"]] == [k % 2 for k in order]
    assert {b["input_ids"].shape[1] for b in tight} == {4, 8, 16}
    assert sum(b["input_ids"].size for b in tight) < 0.75 * sum(b["input_ids"].size for b in plain)  # 544 vs 768
    with pytest.raises(ValueError, match="eval_length_buckets must lie in 1..max_length \\(16\\)"):
        DataConfig(**common, eval_length_buckets=[8, 32])


@pytest.mark.parametrize("case", ["seq_cls", "seq_cls_grouped", "mlm_random_mix", "causal_lm_packed_mix"])
def test_resume_gives_exactly_the_next_batches(tmp_path, case):
    cfg, kind, vocab, tok = _resume_case(tmp_path, case)
    uninterrupted = build_train_iterator(cfg, kind, tok, vocab)
    expected = [next(uninterrupted) for _ in range(12)]
    first = build_train_iterator(cfg, kind, tok, vocab)
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    resumed = build_train_iterator(cfg, kind, tok, vocab)
    resumed.set_state(state)
    _assert_batches_equal([next(resumed) for _ in range(8)], expected[4:])
    if kind == "causal_lm":
        assert set(expected[0]) == {"input_ids", "attention_mask", "labels", "segment_ids", "positions",
                                    "example_mask"}
        assert expected[0]["input_ids"].shape == (2, 12) and expected[0]["segment_ids"].max() > 1


def test_eval_batches_cover_every_example_once(tmp_path):
    cfg = make_cfg(tmp_path, validation=write_jsonl(tmp_path / "v.jsonl", labelled(10)), eval_batch_size=4)
    tok, vocab = word_tokenizer(), build_label_vocab(cfg, "seq_cls")
    batches = list(build_eval_batches(cfg, "validation", "seq_cls", tok, vocab))
    assert len(batches) == 3
    np.testing.assert_array_equal(batches[-1]["example_mask"], [1, 1, 0, 0])
    assert [k for b in batches for k in record_ids(b)] == list(range(10))
    per_process = [list(build_eval_batches(cfg, "validation", "seq_cls", tok, vocab, process_index=p,
                                           process_count=4)) for p in range(4)]
    assert [len(b) for b in per_process] == [3, 3, 3, 3]
    assert all(b["input_ids"].shape[0] == 1 for bs in per_process for b in bs)
    covered = sorted(k for bs in per_process for b in bs for k in record_ids(b))
    assert covered == list(range(10))


def test_eval_rejects_labels_unseen_in_training(tmp_path):
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": "w1", "label": "pos"}, {"text": "w2", "label": "maybe"}])
    cfg = make_cfg(tmp_path, validation=val)
    with pytest.raises(TenureError, match=r"v.jsonl:2: field 'label': unknown label 'maybe' \(known: 'neg', 'pos'\)$"):
        build_eval_batches(cfg, "validation", "seq_cls", word_tokenizer(), build_label_vocab(cfg, "seq_cls"))


def test_over_length_records_are_bad_records_without_truncation(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", labelled(6, length=lambda k: 20 if k == 3 else 1))
    cfg = DataConfig(train=train, batch_size=2, max_length=16, truncate=False, num_epochs=1, shuffle=False)
    vocab = build_label_vocab(cfg, "seq_cls")
    with pytest.raises(TenureError, match=r"t.jsonl:4: field 'text': 22 tokens, longer than max_length 16$"):
        build_train_iterator(cfg, "seq_cls", word_tokenizer(), vocab)
    skip = cfg.model_copy(update={"on_bad_record": "skip"})
    got = [k for b in build_train_iterator(skip, "seq_cls", word_tokenizer(), vocab) for k in record_ids(b)]
    assert got == [0, 1, 2, 4]  # 5 records left, the last one does not fill a batch of 2


def test_to_global_batch_on_8_devices():
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    local = {"input_ids": np.arange(64, dtype=np.int32).reshape(8, 8), "example_mask": np.ones(8, np.float32)}
    arrays = to_global_batch(local, mesh)
    assert arrays["input_ids"].shape == (8, 8)
    assert arrays["input_ids"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(arrays["input_ids"]), local["input_ids"])
    assert len(arrays["input_ids"].addressable_shards) == 8
    assert arrays["input_ids"].addressable_shards[3].data.shape == (1, 8)


def test_inspect_report(tmp_path):
    from tenure.engine.data.inspect import inspect_data

    train = write_jsonl(tmp_path / "train.jsonl", labelled(6, length=lambda k: k + 1)
                        + [{"text": "w0", "label": "neg"}, {"txt": "w1", "label": "pos"}])
    val = tmp_path / "val.jsonl"
    val.write_text('{"text": "w3", "label": "pos"}\n{"text": "w4 w5", "label": "zzz"}\nnot json\n')
    cfg = DataConfig(train=train, validation=str(val), max_length=4, length_buckets=[4])
    lines = inspect_data(cfg, "seq_cls", word_tokenizer()).splitlines()
    assert lines[0] == "data: task seq_cls, format text_label, max_length 4, buckets [4], batch 32"
    assert lines[1] == f"train ({train}): 8 read, 1 bad records, 7 kept"
    assert lines[2] == f"  bad: {train}:8: field 'text': missing"
    assert lines[4:7] == ["  exact duplicate texts remaining: 1", "  labels (2): neg 4 (57.1%), pos 3 (42.9%)",
                          "  tokens: p50 5  p90 7  p99 7  max 8; 4 longer than max_length 4 (truncated)"]
    assert lines[7] == f"validation ({val}): 3 read, 2 bad records, 1 kept"
    assert lines[8:10] == [f"  bad: {val}:2: field 'label': unknown label 'zzz' (known: 'neg', 'pos')",
                           f"  bad: {val}:3: invalid JSON: Expecting value at column 1"]
    assert lines[-1] == "  tokens: p50 3  p90 3  p99 3  max 3; 0 longer than max_length 4 (truncated)"


@pytest.mark.slow
def test_worker_processes_match_threads_and_resume(tmp_path):
    cfg = make_cfg(tmp_path, worker_count=1)
    tok, vocab = word_tokenizer(), build_label_vocab(cfg, "seq_cls")
    threads = build_train_iterator(cfg.model_copy(update={"worker_count": 0}), "seq_cls", tok, vocab)
    expected = [next(threads) for _ in range(8)]
    threads.close()
    workers = build_train_iterator(cfg, "seq_cls", tok, vocab)
    _assert_batches_equal([next(workers) for _ in range(3)], expected[:3])
    state = json.loads(json.dumps(workers.get_state()))
    workers.close()
    resumed = build_train_iterator(cfg, "seq_cls", tok, vocab)
    resumed.set_state(state)
    _assert_batches_equal([next(resumed) for _ in range(5)], expected[3:])
    resumed.close()


def test_a_split_read_again_comes_from_memory_until_its_file_changes(tmp_path, monkeypatch):
    """A run reads one file for its vocabulary, each task and stage; a study worker for many runs:
    small files are parsed once per process, a changed file is read again, a large one never kept."""
    from tenure.engine.data import pipeline
    opened = []
    real_open = pipeline.open_source
    monkeypatch.setattr(pipeline, "open_source", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    path = tmp_path / "train.jsonl"
    write_jsonl(path, labelled(6))
    cfg = DataConfig(train=str(path), labels=["pos"])

    def texts():
        records, _ = pipeline.load_records(cfg, str(path), "seq_cls", split="train")
        return [records[i]["text"] for i in range(len(records))]

    assert texts() == ["w1", "w3", "w5"]
    assert texts() == ["w1", "w3", "w5"] and len(opened) == 1
    assert build_label_vocab(DataConfig(train=str(path)), "seq_cls").labels == ("neg", "pos")
    assert len(opened) == 1                       # the same records, another label filter
    flipped = [{**r, "label": "neg" if r["label"] == "pos" else "pos"} for r in labelled(6)]
    write_jsonl(path, flipped)                    # same size, maybe within the clock's tick: read again
    assert texts() == ["w0", "w2", "w4"] and len(opened) == 2
    write_jsonl(path, labelled(8))
    assert texts() == ["w1", "w3", "w5", "w7"] and len(opened) == 3
    monkeypatch.setattr(pipeline, "_KEPT_BYTES", 10)
    assert texts() == texts() == ["w1", "w3", "w5", "w7"] and len(opened) == 5


@pytest.mark.parametrize("mode", ["interleave", "random"])
def test_a_mixture_counts_its_batches_until_the_first_source_ends(tmp_path, mode):
    """num_epochs passes of the first source, which has a share of each batch: 2 passes of 20
    records at share 1/3 (interleave) take 30 batches of 4, not the 10 a lone source would."""
    first = write_jsonl(tmp_path / "a.jsonl", labelled(20))
    other = write_jsonl(tmp_path / "b.jsonl", labelled(30)[20:])
    cfg = DataConfig(train={"a": {"path": first, "weight": 1}, "b": {"path": other, "weight": 2}}, batch_size=4,
                     max_length=16, length_buckets=[4, 8, 16], num_epochs=2, mix_mode=mode, seed=1, read_threads=2)
    it = build_train_iterator(cfg, "seq_cls", word_tokenizer(), build_label_vocab(cfg, "seq_cls"))
    batches = list(it)
    assert it.num_batches == len(batches) and (mode == "random" or len(batches) == 30)
    seen = [k for b in batches for k in record_ids(b) if k < 20]
    assert 40 - 4 < len(seen) <= 40  # both passes of the first source, up to the dropped partial batch
    assert sorted(seen[:20]) == list(range(20))


def test_settings_that_would_silently_mean_something_else_are_refused(tmp_path):
    """data.labels on token tags (every tag was still trained), label_noise on regression targets in
    text_label format (a target swapped for another observed number), augment on token tags (the
    copies were the records unchanged), subset over several sources (N of each), and a malformed
    WordNet line (a traceback): one line each."""
    from tenure.engine.data.augment import WORDNET_FILES, load_synonyms
    from tenure.engine.data.pipeline import load_records, load_train_records

    tags = write_jsonl(tmp_path / "tags.jsonl", [{"tokens": ["a", "b"], "tags": t} for t in (["B-PER", "O"], ["B-LOC", "O"])])
    reg = write_jsonl(tmp_path / "reg.jsonl", [{"text": "w1", "label": v} for v in (4.5, 1.0, 3.0, 5.0)])
    cases = [
        (lambda: load_records(DataConfig(train=tags, labels=["B-PER", "O"]), tags, "token_cls", split="train"),
         r"^data.labels: keeps the records whose class label is listed; token_cls records in format token_tags "
         r"have none \(a tag per token\)$"),
        (lambda: load_records(DataConfig(train=reg, format="text_label", label_noise=0.5), reg, "regression",
                              split="train", with_augment=True), r"^data.label_noise: this task's data has no class labels"),
        (lambda: load_records(DataConfig(train=tags, augment={"copies": 2, "synonym_replacement": 0}), tags, "token_cls",
                              split="train", with_augment=True), r"^data.augment: rewrites text fields; token_tags records"),
        (lambda: load_train_records(DataConfig(train={"a": {"path": reg}, "b": {"path": reg}}, subset=2), "seq_cls",
                                    None, None), r"^data.subset: keeps N training records of one source; this task mixes 2"),
    ]
    for call, message in cases:
        with pytest.raises(TenureError, match=message):
            call()
    for name in WORDNET_FILES:
        (tmp_path / name).write_text("00001740 03 n 01 entity 0 000 | that which exists\n\nentity\n")
    with pytest.raises(TenureError, match=rf"^{tmp_path}/data.noun:3: not a WordNet 3 data line"):
        load_synonyms(str(tmp_path))
