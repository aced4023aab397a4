"""The `data` config section: where records come from and how they become batches."""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tenure.engine.data.augment import AugmentConfig
from tenure.engine.data.cleaning import CleaningConfig
from tenure.engine.data.records import RECORD_FORMATS

Paths = Union[str, list[str]]


class SourceConfig(BaseModel):
    """One named source of a training mixture."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Paths = Field(description="a file, a glob, or a list of them")
    weight: float = Field(1.0, gt=0, description="relative share of training examples from this source")


def default_buckets(max_length: int) -> list[int]:
    """Powers of two from 32 below max_length, then max_length itself."""
    buckets, b = [], 32
    while b < max_length:
        buckets.append(b)
        b *= 2
    return buckets + [max_length]


class DataConfig(BaseModel):
    """Data for one training stage: sources, record format, cleaning, tokenisation, batching."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str | None = Field(None, description="record format (text_label, pair, token_tags, text_target, "
                               "prompt_completion, chat, text, retrieval); null = the task's default")
    fields: dict[str, str] = Field(default_factory=dict,
                                   description="canonical field -> the field name in your files")
    file_format: str | None = Field(None, description="jsonl/csv/tsv/parquet/arrayrecord (csv: quoted cells may "
                                    "hold commas and newlines; tsv: no quoting, one row per line); null = from the "
                                    "extension")
    train: Paths | dict[str, SourceConfig] | None = Field(
        None, description="path, glob or list; or named weighted sources {name: {path, weight}} for a mixture")
    validation: Paths | None = Field(None, description="validation split (path, glob or list)")
    test: Paths | None = Field(None, description="test split (path, glob or list)")
    mix_mode: Literal["interleave", "random"] = Field(
        "interleave", description="mixture order: deterministic pattern, or weighted random draws")
    on_bad_record: Literal["error", "skip"] = Field("error", description="stop at a bad record, or skip and count it")
    clean: CleaningConfig = Field(default_factory=CleaningConfig, description="text cleaning and deduplication")
    augment: AugmentConfig | None = Field(None, description="EDA augmentation of the training split; null = off")
    max_length: int = Field(128, ge=2, description="tokens per example (and per packed row)")
    length_buckets: list[int] | None = Field(
        None, min_length=1, validate_default=True, description="pad each batch to the smallest bucket >= its longest example; null = powers of two "
                          "from 32 up to max_length (max_length is always the last bucket)")
    eval_length_buckets: list[int] | None = Field(
        None, min_length=1, description="padding widths of validation and test batches, which then run in length order (less padding, "
                          "the same per-example results up to float rounding); training keeps length_buckets. null = "
                          "length_buckets (eval in length order only with group_by_length)")
    truncate: bool = Field(True, description="cut over-long examples to max_length; false = they are bad records")
    pack: bool = Field(False, description="pack several examples per row of max_length tokens. causal_lm: rows filled "
                       "from the example stream; seq_cls, pair_cls, regression, sft: each batch's same examples packed into "
                       "fewer rows (block-diagonal attention, positions restart per example: exact per-example logits, "
                       "loss and metrics; training batches take the row count 99% of them need, so the step compiles "
                       "once or twice; eval packed too; no saving with several processes); other kinds cannot pack")
    group_by_length: int = Field(
        0, ge=0, description="sort each window of this many training batches by length, then shuffle the batches "
                             "(less padding, same per-example losses); evaluation runs in length order too. No effect with one "
                             "padding width (one bucket, or several processes); 0 = off")
    batch_size: int = Field(32, ge=1, description="global training batch size (all processes)")
    eval_batch_size: int | None = Field(None, ge=1, description="global eval batch size; null = batch_size")
    shuffle: bool = Field(True, description="shuffle the training data (a new order every epoch)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed for shuffling, mixing, MLM masking, augmentation, subset and label noise")
    labels: list[str] | None = Field(
        None, description="keep only records whose label is one of these, in every split (e.g. the classes of one "
                          "task of a class-incremental split); null = all")
    subset: int | None = Field(
        None, ge=1, description="keep this many training records, the first N of a seeded shuffle (data.seed); "
                                "null = all. Validation and test are untouched")
    label_noise: float = Field(
        0.0, ge=0, lt=1, description="share of training labels flipped to a different label (seeded by data.seed; "
                                     "the count is reported); 0 = none. Validation and test are untouched")
    num_epochs: int | None = Field(None, ge=1, description="passes over the training data (a mixture or a "
                                   "replaying stage: over its first source, the others repeat as needed); null = repeat "
                                   "forever (training is step-driven)")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="share of tokens selected for MLM")
    worker_count: int = Field(0, ge=0, description="grain worker processes; 0 = threads in this process")
    read_threads: int = Field(4, ge=1, description="threads reading and tokenising examples")
    prefetch: int = Field(2, ge=0, description="batches buffered ahead of the training step")

    @field_validator("format")
    @classmethod
    def _known_format(cls, value):
        if value is not None and value not in RECORD_FORMATS:
            raise ValueError(f"unknown record format {value!r}; expected one of {', '.join(RECORD_FORMATS)}")
        return value

    @model_validator(mode="after")
    def _pack_or_group(self):
        if self.pack and self.group_by_length:
            raise ValueError("pack and group_by_length both remove padding; set one of them")
        return self

    @field_validator("labels")
    @classmethod
    def _labels_once(cls, value):  # a label written twice is likely a typo for another one
        twice = sorted({label for label in value or () if value.count(label) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed twice")
        return value

    @field_validator("length_buckets", "eval_length_buckets")
    @classmethod
    def _resolve_buckets(cls, value, info):
        max_length = info.data.get("max_length")
        if max_length is None:  # max_length itself failed validation, which reports it
            return value
        if value is None and info.field_name == "eval_length_buckets":
            return None
        buckets = sorted(set(value or default_buckets(max_length)))
        if buckets[0] < 1 or buckets[-1] > max_length:
            raise ValueError(f"{info.field_name} must lie in 1..max_length ({max_length}), got {buckets}")
        if buckets[-1] != max_length:
            buckets.append(max_length)
        return buckets

    @property
    def sources(self) -> dict[str, SourceConfig]:
        """The training sources by name; a plain path is one source named 'train'."""
        if isinstance(self.train, dict):
            return dict(self.train)
        return {} if self.train is None else {"train": SourceConfig(path=self.train)}

    @property
    def global_eval_batch_size(self) -> int:
        return self.eval_batch_size or self.batch_size
