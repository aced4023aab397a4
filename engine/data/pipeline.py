"""grain pipelines: canonical records -> per-process numpy batches -> global jax.Arrays.

Training (`build_train_iterator`), per source: equal per-process shards
`records[:n - n % P][p::P]` -> seeded shuffle (a new order each epoch) -> repeat
(`num_epochs`, or forever) -> featurise (MLM masks from an rng keyed by (seed, index)) ->
read threads; named sources are then mixed (`mixture.MixIterDataset`), LM rows optionally
packed, and rows batched to `batch_size / process_count` with bucketed padding (with several
processes, every batch pads to the last bucket, max_length: each process pads its own rows
and all must agree on the global shape without a collective per step). With `data.pack` for a
kind with one output per example (seq_cls, pair_cls, regression) or sft, the batches are the
same examples packed into fewer rows (`batch_packing.pack_batch` / `pack_rows`). The
iterator state is grain's (indices and small dicts), so it is JSON and resume is exact.

Evaluation (`build_eval_batches`): every example exactly once, process p taking examples
p, p+P, ...; every process yields the same number of batches, the last ones padded with
`example_mask` 0 rows. With `data.pack` (kinds packed per batch) eval batches are packed too.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import math
import os
from typing import Iterator

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tenure.engine.data.augment import augment
from tenure.engine.data.batch_packing import global_rows, pack_batch, pack_rows, planned_rows
from tenure.engine.data.cleaning import CleaningReport, clean
from tenure.engine.data.config import DataConfig
from tenure.engine.data.grouping import LengthGroupIterDataset, length_order
from tenure.engine.data.mixture import MixIterDataset, examples_before
from tenure.engine.data.packing import PackIterDataset, collate
from tenure.engine.data.records import (LABEL_FIELDS, TEXT_FIELDS, BadRecordReport, LabelVocab, over_length_error,
                                        validate)
from tenure.engine.data.sources import open_source, resolve_paths, select
from tenure.engine.data.subsample import describe, subsample_and_corrupt
from tenure.engine.data.tokenize import Featurizer, resolve_format
from tenure.models.errors import TenureError
from tenure.engine.tasks.kinds import KINDS, pack_error



@dataclasses.dataclass
class SplitReport:
    """Where a split's records went: validation, cleaning, and the max_length check."""

    split: str
    bad_records: BadRecordReport
    cleaning: CleaningReport
    over_length: int = 0  # skipped because longer than max_length (only when truncate is false)

    def skipped_line(self) -> str | None:
        """`data: train skipped 3 of 400 records: 2 x field 'label': missing; ...`, or None
        when nothing was skipped (printed once per split by the builders below)."""
        bad = self.bad_records
        reasons = sorted(bad.reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        parts = [f"{n} x {reason}" for reason, n in reasons[:3]]
        if len(reasons) > 3:
            parts.append(f"{sum(n for _, n in reasons[3:])} x other reasons")
        if self.over_length:
            parts.append(f"{self.over_length} x longer than max_length")
        skipped = bad.skipped + self.over_length
        if not skipped:
            return None
        first = f" (first: {bad.first[0]})" if bad.first else ""
        return f"data: {self.split} skipped {skipped} of {bad.total} records: {'; '.join(parts)}{first}"


def _report_skips(report: SplitReport) -> None:
    line = report.skipped_line()
    if line and jax.process_index() == 0:
        print(line, flush=True)


# Small splits are parsed and cleaned once per process and kept: a run reads each file for its
# label vocabulary, every task and stage, and evaluation, and a study worker runs many runs
# (split_lexnames: 4 tasks x 3 readings of one 8,000-line file cost 15 s of a 200 s run).
# Keyed by the files' contents (a file rewritten within the clock's tick is still read again);
# larger files stay lazily re-read from disk, as the pipeline is built to do.
_KEPT_BYTES = 64 << 20
_KEPT: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()


def _parsed(cfg: DataConfig, paths, fmt: str, task_kind: str, split: str, label_vocab: LabelVocab | None):
    """(validated, cleaned records; BadRecordReport; CleaningReport), kept for files of at most
    _KEPT_BYTES in all and returned again for the same contents and settings."""
    def parse():
        records, bad = validate(open_source(paths, cfg.file_format), fmt, cfg.fields, cfg.on_bad_record,
                                label_vocab=label_vocab, split=split, path=str(paths),
                                numeric_labels=KINDS[task_kind].numeric_labels)
        return (*clean(records, cfg.clean, TEXT_FIELDS[fmt], split=split, path=str(paths)), bad)

    files = resolve_paths(paths)
    size = sum(os.path.getsize(path) for path in files)
    if size > _KEPT_BYTES:
        records, cleaned, bad = parse()
        return records, bad, cleaned
    digest = hashlib.blake2b()
    for path in files:
        with open(path, "rb") as f:
            digest.update(f.read())
    key = (tuple(files), digest.hexdigest(), fmt, cfg.file_format, repr(cfg.fields), cfg.on_bad_record,
           label_vocab.to_json() if label_vocab else None, KINDS[task_kind].numeric_labels, repr(cfg.clean), split,
           str(paths))
    if key not in _KEPT:
        records, cleaned, bad = parse()
        _KEPT[key] = size, (grain.MapDataset.source([records[i] for i in range(len(records))]), bad, cleaned)
        while sum(kept for kept, _ in _KEPT.values()) > _KEPT_BYTES:
            _KEPT.popitem(last=False)
    _KEPT.move_to_end(key)
    return _KEPT[key][1]


def load_records(cfg: DataConfig, paths, task_kind: str, *, split: str,
                 label_vocab: LabelVocab | None = None, with_augment: bool = False):
    """Read, validate, clean (and augment) one split -> (MapDataset of canonical records, SplitReport)."""
    fmt = resolve_format(task_kind, cfg.format)
    # With data.labels the vocabulary check waits for the label filter (other labels are dropped).
    records, bad, cleaned = _parsed(cfg, paths, fmt, task_kind, split,
                                    label_vocab if cfg.labels is None else None)
    # One class label per record: what data.labels keeps records by and label_noise flips (a
    # regression target is a number, token tags are one per token).
    kind = KINDS[task_kind]
    label_field = LABEL_FIELDS.get(fmt) if fmt != "token_tags" and not kind.numeric_labels else None
    if cfg.labels is not None and not label_field:
        raise TenureError(f"data.labels: keeps the records whose class label is listed; {task_kind} records in "
                          f"format {fmt} have none (" + ("a tag per token" if fmt == "token_tags" else
                                                         "a number" if kind.numeric_labels else "no label") + ")")
    if cfg.labels is not None:
        wanted = set(cfg.labels)
        records = select(records, np.asarray([i for i in range(len(records)) if records[i][label_field] in wanted]))
        if not len(records):
            raise TenureError(f"{paths}: no {split} record has a label in data.labels {cfg.labels}")
    if with_augment and (cfg.subset is not None or cfg.label_noise):
        labels = sorted({records[i][label_field] for i in range(len(records))}) if label_field else None
        kept, report = subsample_and_corrupt([records[i] for i in range(len(records))], cfg, label_field, labels)
        records = grain.MapDataset.source(kept)
        print(f"{paths}: {describe(report)}", flush=True)
    if with_augment and cfg.augment is not None and cfg.augment.copies:
        if fmt in ("token_tags", "chat"):  # the copies were the records unchanged, each trained 1 + copies times
            raise TenureError(f"data.augment: rewrites text fields; {fmt} records hold lists ("
                              + ("tokens with a tag each" if fmt == "token_tags" else "messages")
                              + "), which it cannot rewrite; set data.augment: null")
        records = augment(records, cfg.augment, cfg.seed, TEXT_FIELDS[fmt])
    return records, SplitReport(split, bad, cleaned)


def build_label_vocab(cfg: DataConfig, task_kind: str) -> LabelVocab | None:
    """The label (or tag) vocabulary of the training data; None for unlabelled task kinds."""
    if not KINDS[task_kind].labelled:
        return None
    fmt = resolve_format(task_kind, cfg.format)
    if fmt not in LABEL_FIELDS:
        return None
    all_records = []
    for name, source in cfg.sources.items():
        records, _ = load_records(cfg, source.path, task_kind, split=name)
        all_records.extend(records[i] for i in range(len(records)))
    if not all_records:
        raise TenureError("data.train: no training data configured")
    vocab = LabelVocab.from_records(all_records, fmt)
    if cfg.labels is not None:
        _check_wanted_labels(cfg, task_kind, fmt, vocab)
    return vocab


def _check_wanted_labels(cfg: DataConfig, task_kind: str, fmt: str, vocab: LabelVocab) -> None:
    """Every label of data.labels must occur in the training data: a typo would silently train
    a task with fewer classes (a one-class task scores 1.0)."""
    unknown = [label for label in cfg.labels if label not in vocab.labels]
    if not unknown:
        return
    every = cfg.model_copy(update={"labels": None})
    present = LabelVocab.from_records([r for name, source in cfg.sources.items() for r in
                                       load_records(every, source.path, task_kind, split=name)[0]], fmt)
    paths = ", ".join(str(source.path) for source in cfg.sources.values())
    raise TenureError(f"{paths}: data.labels: {', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} "
                      f"not the label of any training record; the training data has "
                      f"{', '.join(map(repr, present.labels))}")


def num_negatives(records) -> int:
    """Hard negatives per retrieval example: the fewest any record has (P = 1 + this)."""
    return min(len(records[i].get("negatives") or []) for i in range(len(records)))


def make_featurizer(cfg: DataConfig, task_kind: str, tokenizer, label_vocab, records=None) -> Featurizer:
    fmt = resolve_format(task_kind, cfg.format)
    negatives = num_negatives(records) if fmt == "retrieval" and records is not None else 0
    return Featurizer(task_kind, fmt, tokenizer, label_vocab, max_length=cfg.max_length,
                      mlm_probability=cfg.mlm_probability, num_negatives=negatives)


def drop_over_length(records, featurizer: Featurizer, cfg: DataConfig, report: SplitReport, chunk: int = 256):
    """With `truncate: false`, over-long records are bad records (error, or skipped and counted)."""
    if cfg.truncate:
        return records
    kept = []
    field = TEXT_FIELDS[featurizer.fmt][0]
    for start in range(0, len(records), chunk):
        batch = [records[i] for i in range(start, min(start + chunk, len(records)))]
        for offset, (record, n) in enumerate(zip(batch, featurizer.lengths(batch))):
            if n <= cfg.max_length:
                kept.append(start + offset)
            elif cfg.on_bad_record == "error":
                raise over_length_error(record["location"], field, n, cfg.max_length)
            else:
                report.over_length += 1
    if not kept:
        raise TenureError(f"{report.split} data: no records left after the max_length check")
    return select(records, np.asarray(kept))


class TaskFeaturizer:
    """A featurizer that also stamps every example with its task's index (`task_id`), so a batch
    mixing several tasks (multi-task stages, replay) knows whose head and loss each row takes."""

    def __init__(self, featurizer: Featurizer, task_id: int):
        self.inner, self.task_id = featurizer, task_id

    def __getattr__(self, name):  # task_kind, fmt, lengths, ... of the wrapped featurizer
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __call__(self, records, rngs=None) -> list[dict]:
        examples = self.inner(records, rngs)
        for example in examples:
            example["task_id"] = np.asarray(self.task_id, np.int32)
        return examples


class _FeaturizeOne:
    """Picklable per-example featuriser for grain `map` / `random_map` (workers included)."""

    def __init__(self, featurizer):
        self.featurizer = featurizer

    def __call__(self, record: dict, rng: np.random.Generator | None = None) -> dict:
        return self.featurizer([record], None if rng is None else [rng])[0]


def process_buckets(buckets, process_count: int) -> tuple[int, ...]:
    """The padding buckets a process may use. One process: all of them (the smallest that fits
    each batch). Several: only the largest (max_length), a width every process knows in advance,
    so the processes' local batches form one global array with no per-step exchange of widths."""
    buckets = tuple(buckets)
    return buckets if process_count == 1 else buckets[-1:]


def _example_stream(records, featurizer, *, process_index: int, process_count: int,
                    shuffle: bool, seed: int, num_epochs: int | None, read_threads: int) -> grain.IterDataset:
    usable = len(records) - len(records) % process_count
    if usable == 0:
        raise TenureError(f"data.train: {len(records)} records cannot be split over {process_count} processes")
    ds = records if isinstance(records, grain.MapDataset) else grain.MapDataset.source(records)
    ds = ds[:usable][process_index::process_count]
    if shuffle:
        ds = ds.seed(seed).shuffle()
    ds = ds.repeat(num_epochs)
    featurize = _FeaturizeOne(featurizer)
    ds = ds.random_map(featurize, seed=seed) if featurizer.kind.random_features else ds.map(featurize)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * read_threads))


def local_batch_size(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise TenureError(f"data.batch_size: {global_batch} is not divisible by the {process_count} processes")
    return global_batch // process_count


class TrainIterator:
    """Process-local training batches; `get_state()` / `set_state()` resume exactly.

    `num_examples`: records per epoch of the first (primary) source, over all processes,
    after the equal-shard cut. `num_batches`: batches until the data ends (`num_epochs` set,
    no packing), else None; batches may straddle epochs, only the last partial one is dropped.
    """

    def __init__(self, dataset: grain.IterDataset, featurizer: Featurizer, *, num_examples: int,
                 num_batches: int | None):
        self.featurizer = featurizer
        self.num_examples, self.num_batches = num_examples, num_batches
        self.grain_iterator = iter(dataset)  # for grain.checkpoint.CheckpointSave / Restore

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self.grain_iterator)

    def next_batch(self, step: int | None = None) -> dict[str, np.ndarray]:
        """`next(self)` for the training loop: data that runs out (num_epochs) is a TenureError
        naming the step, not a bare StopIteration."""
        try:
            return next(self.grain_iterator)
        except StopIteration:
            at = f" at step {step}" if step is not None else ""
            raise TenureError(f"data.train: the training data ran out{at} (data.num_epochs passes"
                              f"{f', {self.num_batches} batches' if self.num_batches else ''}); raise "
                              "data.num_epochs, lower train.steps, or unset data.num_epochs") from None

    def peek(self) -> dict[str, np.ndarray]:
        """The next batch, without consuming it."""
        state = self.get_state()
        batch = next(self)
        self.set_state(state)
        return batch

    def get_state(self) -> dict:
        return self.grain_iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.grain_iterator.set_state(state)

    def close(self) -> None:
        self.grain_iterator.close()


def _mark_absl_flags_parsed() -> None:
    """grain worker processes read absl flags; outside an absl app they are unparsed (pitfall)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@dataclasses.dataclass
class TrainSource:
    """One named stream of a training mixture: checked records, their featurizer, a share."""
    name: str
    records: object
    featurizer: object
    weight: float = 1.0


def _sample_lengths(records, featurizer, *, seed: int, count: int = 1024) -> list[int]:
    """Token lengths of up to `count` records drawn at random (`planned_rows` draws batches from them)."""
    picks = np.random.default_rng(seed).permutation(len(records))[:count]
    examples = featurizer([records[int(i)] for i in picks], [np.random.default_rng([seed, int(i)]) for i in picks])
    return [len(example["input_ids"]) for example in examples]


def batch_packer(cfg: DataConfig, task_kind: str):
    """How `data.pack` packs the examples within each batch: `pack_batch` (seq_cls, pair_cls,
    regression), `pack_rows` (sft), or None (off, or causal_lm's rows filled from the stream);
    TenureError (one line) for a kind that cannot pack."""
    if not cfg.pack:
        return None
    problem = pack_error(task_kind)
    if problem:
        raise TenureError(problem)
    return {"batch": pack_batch, "rows": pack_rows}.get(KINDS[task_kind].pack)


def train_dataset(cfg: DataConfig, sources: list[TrainSource], *, pad_id: int, process_index: int,
                  process_count: int, seed: int, batch_shards: int = 1, accum_steps: int = 1) -> grain.IterDataset:
    """Batches of `cfg.batch_size / process_count` rows from the sources, mixed by weight.

    The first source sets the epoch count (`cfg.num_epochs`); the others repeat as needed.
    `batch_shards` (data x fsdp shards per process) and `accum_steps` (grad_accum_steps) lay out
    packed batches (`batch_packing`)."""
    task_kind = sources[0].featurizer.task_kind
    packer = batch_packer(cfg, task_kind)
    streams = {}
    for k, source in enumerate(sources):
        epochs = cfg.num_epochs if k == 0 else None
        streams[source.name] = _example_stream(
            source.records, source.featurizer, process_index=process_index, process_count=process_count,
            shuffle=cfg.shuffle, seed=seed + k, num_epochs=epochs, read_threads=cfg.read_threads)
    if len(streams) == 1:
        ds = next(iter(streams.values()))
    else:
        ds = MixIterDataset(streams, {s.name: s.weight for s in sources}, mode=cfg.mix_mode, seed=seed)
    rows = local_batch_size(cfg.batch_size, process_count)
    buckets = process_buckets(cfg.length_buckets, process_count)
    batch_fn = functools.partial(collate, buckets=buckets, pad_id=pad_id)
    if packer:
        per_micro = rows // accum_steps
        min_rows = per_micro if process_count > 1 else planned_rows(
            [_sample_lengths(s.records, s.featurizer, seed=seed + k) for k, s in enumerate(sources)],
            [s.weight for s in sources], examples=per_micro, row_length=cfg.max_length, shards=batch_shards,
            separate=packer is pack_rows, seed=seed)
        batch_fn = functools.partial(packer, row_length=cfg.max_length, pad_id=pad_id, accum=accum_steps,
                                     shards=batch_shards, min_rows=min_rows)
    elif cfg.pack:
        ds = PackIterDataset(ds, cfg.max_length, pad_id=pad_id)
    elif cfg.group_by_length and len(buckets) > 1:  # with one width, grouping saves nothing
        ds = LengthGroupIterDataset(ds, rows=rows, window=cfg.group_by_length, seed=seed)
    ds = ds.batch(rows, drop_remainder=True, batch_fn=batch_fn)
    if cfg.worker_count:
        _mark_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                         per_worker_buffer_size=max(cfg.prefetch, 1)))
    elif cfg.prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch)
    return ds


def plan_total_steps(steps: int | None, num_epochs: int | None, num_batches: int | None) -> int:
    """Optimizer steps of a run from `train.steps`, `data.num_epochs` and the iterator's
    `num_batches` (None when packing: packed rows are not counted before training).
    TenureError, one line, where they do not fit together."""
    if steps is None and num_epochs is None:
        raise TenureError("config: set train.steps or data.num_epochs")
    if steps is None:
        if num_batches is None:
            raise TenureError("config: data.pack with data.num_epochs needs train.steps (packed rows "
                              "are not counted before training)")
        if num_batches < 1:
            raise TenureError(f"data.train: {num_epochs} epoch(s) give no full batch of data.batch_size; "
                              "lower data.batch_size or raise data.num_epochs")
        return num_batches
    if num_epochs is not None and num_batches is not None and steps > num_batches:
        raise TenureError(f"config: train.steps={steps} is more than the {num_batches} batches that "
                          f"data.num_epochs={num_epochs} gives; raise data.num_epochs, lower train.steps, "
                          "or unset data.num_epochs (the data then repeats)")
    return steps


def load_train_records(cfg: DataConfig, task_kind: str, tokenizer, label_vocab) -> dict:
    """Each named training source's records, validated, cleaned, augmented and length-checked."""
    if not cfg.sources:
        raise TenureError("data.train: no training data configured")
    if cfg.subset is not None and len(cfg.sources) > 1:  # it kept N of each source: N x sources in all
        raise TenureError(f"data.subset: keeps N training records of one source; this task mixes "
                          f"{len(cfg.sources)} ({', '.join(cfg.sources)}): cut the source files instead")
    fmt = resolve_format(task_kind, cfg.format)
    records_by_source = {}
    for name, source in cfg.sources.items():
        records, report = load_records(cfg, source.path, task_kind, split=name, with_augment=True)
        checker = make_featurizer(cfg, task_kind, tokenizer, label_vocab, records if fmt == "retrieval" else None)
        records_by_source[name] = drop_over_length(records, checker, cfg, report)
        _report_skips(report)
    return records_by_source


def make_train_iterator(cfg: DataConfig, sources: list[TrainSource], *, pad_id: int, process_index: int,
                        process_count: int, seed: int, batch_shards: int = 1,
                        accum_steps: int = 1) -> "TrainIterator":
    ds = train_dataset(cfg, sources, pad_id=pad_id, process_index=process_index, process_count=process_count,
                       seed=seed, batch_shards=batch_shards, accum_steps=accum_steps)
    per_process = len(sources[0].records) // process_count
    num_examples = per_process * process_count
    # LM packing fills rows from the stream (rows are not counted ahead); packing per batch keeps the batches.
    finite = cfg.num_epochs is not None and not (cfg.pack and KINDS[sources[0].featurizer.task_kind].pack == "stream")
    num_batches = None
    if finite:  # the data ends with the first source's last pass; in a mixture it is a share of each batch
        count = cfg.num_epochs * per_process
        if len(sources) > 1:
            count = examples_before({s.name: s.weight for s in sources}, cfg.mix_mode, seed, count)
        num_batches = count // local_batch_size(cfg.batch_size, process_count)
    return TrainIterator(ds, sources[0].featurizer, num_examples=num_examples, num_batches=num_batches)


def build_train_iterator(cfg: DataConfig, task_kind: str, tokenizer, label_vocab: LabelVocab | None, *,
                         process_index: int = 0, process_count: int = 1, seed: int | None = None,
                         task_id: int | None = None, batch_shards: int = 1, accum_steps: int = 1) -> TrainIterator:
    """Training batches of one task for this process (`batch_size / process_count` examples each).

    Reads `cfg.train` (one path or named weighted sources), validates, cleans, augments,
    and (with `truncate: false`) applies the max_length check before sharding, so every
    process sees the same record set. `seed` defaults to `cfg.seed`; `task_id` stamps examples;
    `batch_shards` / `accum_steps` lay out packed batches (`train_dataset`).
    """
    records_by_source = load_train_records(cfg, task_kind, tokenizer, label_vocab)
    first = next(iter(records_by_source.values()))
    featurizer = make_featurizer(cfg, task_kind, tokenizer, label_vocab, first)
    if task_id is not None:
        featurizer = TaskFeaturizer(featurizer, task_id)
    configured = cfg.sources
    sources = [TrainSource(name, records, featurizer, configured[name].weight)
               for name, records in records_by_source.items()]
    return make_train_iterator(cfg, sources, pad_id=tokenizer.pad_token_id or 0, process_index=process_index,
                               process_count=process_count, seed=cfg.seed if seed is None else seed,
                               batch_shards=batch_shards, accum_steps=accum_steps)


class EvalBatches:
    """Re-iterable padded eval batches; `len()` is the same on every process. With `packer`
    (`batch_packer`'s function) they are packed into rows of `row_length` (`batch_shards` per
    process)."""

    def __init__(self, records, featurizer: Featurizer, *, global_batch: int, buckets, pad_id: int,
                 process_index: int, process_count: int, seed: int, by_length: bool = False,
                 packer=None, row_length: int = 0, batch_shards: int = 1):
        self.records, self.featurizer = records, featurizer
        self._packer, self._row_length, self._batch_shards = packer, row_length, batch_shards
        self.rows = local_batch_size(global_batch, process_count)
        self.num_examples = len(records)
        self.num_batches = math.ceil(len(records) / global_batch)
        self._indices = np.arange(len(records))[process_index::process_count]
        self._buckets, self._pad_id, self._seed = process_buckets(buckets, process_count), pad_id, seed
        if by_length and len(self._buckets) > 1:  # similar lengths share a batch: less padding (data.group_by_length)
            lengths = [n for start in range(0, len(self._indices), 512)
                       for n in featurizer.lengths([records[int(i)] for i in self._indices[start:start + 512]])]
            self._indices = self._indices[length_order(lengths)]
        # Several processes agree on the shape in advance; one packs each batch into the rows it needs
        # (an eval step compiles fast, and a split sorted by length would pad its short batches a lot).
        self._min_rows = self.rows if process_count > 1 else 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for b in range(self.num_batches):
            chunk = self._indices[b * self.rows:(b + 1) * self.rows]
            # A process with no examples left still yields a batch: one padding row template.
            take = chunk if len(chunk) else self._indices[:1] if len(self._indices) else np.arange(1)
            rngs = [np.random.default_rng([self._seed, int(i)]) for i in take]
            examples = self.featurizer([self.records[int(i)] for i in take], rngs)
            if self._packer:
                yield self._packer(examples, row_length=self._row_length, pad_id=self._pad_id, slots=self.rows,
                                   real=len(chunk), shards=self._batch_shards, min_rows=self._min_rows)
                continue
            batch = collate(examples, self._buckets, pad_id=self._pad_id, rows=self.rows)
            batch["example_mask"][len(chunk):] = 0.0
            yield batch


def build_eval_batches(cfg: DataConfig, split: str, task_kind: str, tokenizer, label_vocab: LabelVocab | None,
                       *, process_index: int = 0, process_count: int = 1,
                       task_id: int | None = None, batch_shards: int = 1) -> EvalBatches:
    """Padded (or with `data.pack`, packed) batches of `split` ("validation", "test" or "train")
    covering every example once."""
    paths = {"validation": cfg.validation, "test": cfg.test}.get(split)
    if split == "train":
        paths = [p for s in cfg.sources.values() for p in ([s.path] if isinstance(s.path, str) else s.path)]
    if not paths:
        raise TenureError(f"data.{split}: no {split} data configured")
    records, report = load_records(cfg, paths, task_kind, split=split, label_vocab=label_vocab)
    featurizer = make_featurizer(cfg, task_kind, tokenizer, label_vocab, records)
    records = drop_over_length(records, featurizer, cfg, report)
    _report_skips(report)
    if task_id is not None:
        featurizer = TaskFeaturizer(featurizer, task_id)
    tight = cfg.eval_length_buckets is not None
    packer = batch_packer(cfg, task_kind)
    return EvalBatches(records, featurizer, global_batch=cfg.global_eval_batch_size,
                       buckets=cfg.eval_length_buckets if tight else cfg.length_buckets,
                       pad_id=tokenizer.pad_token_id or 0, process_index=process_index,
                       process_count=process_count, seed=cfg.seed, by_length=tight or cfg.group_by_length > 0,
                       packer=packer, row_length=cfg.max_length,
                       batch_shards=batch_shards)


def to_global_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                    data_axes: tuple[str, ...] = ("data", "fsdp")) -> dict[str, jax.Array]:
    """Assemble the processes' local batches into global arrays sharded on the batch axis.
    With several processes their widths already agree (`process_buckets`), and a packed batch's
    `example_row` (a row of the process's batch) becomes a row of the global batch."""
    axes = tuple(a for a in data_axes if a in mesh.axis_names)
    sharding = NamedSharding(mesh, P(axes if axes else None))
    if "example_row" in local_batch and jax.process_count() > 1:
        shards = math.prod(mesh.shape[a] for a in axes)
        blocks = sorted({index[0].start or 0 for index in
                         sharding.addressable_devices_indices_map((shards,)).values()})
        rows = local_batch["input_ids"].shape[0]
        local_batch = dict(local_batch, example_row=global_rows(local_batch["example_row"], blocks,
                                                                rows // len(blocks)))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
