"""Typed run config: YAML file + `key.sub=value` overrides -> validated `Config`.

Each part of the engine owns its section as a pydantic model (extra keys forbidden);
this module composes them and turns every validation failure into one `TenureError`
line that names the key, so a typo never reaches the training loop.
"""
from __future__ import annotations

import math
import os
import pathlib
import types
import typing
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tenure.engine.config import yamlfile
from tenure.engine.runtime.checkpoint import CheckpointConfig
from tenure.engine.data.config import DataConfig
from tenure.engine.train.divergence import DivergenceConfig
from tenure.models.errors import TenureError
from tenure.engine.train.optim import OptimConfig
from tenure.engine.runtime.sharding import MeshConfig
from tenure.engine.runtime.xla_env import auto_compute_dtype
from tenure.engine.config.plan import plan
from tenure.engine.config.stages import EWCConfig, KLConfig, L2SPConfig, ReplayConfig, StageConfig
from tenure.engine.train.trainability import TrainableConfig
from tenure.engine.tasks.kinds import KINDS

TaskKind = Literal[tuple(KINDS)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    path: str = Field(min_length=1, description="HF model directory (config.json + safetensors), or the alias 'minilm'")
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="'random' keeps the architecture but re-initialises all weights")
    dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="compute dtype; parameters and optimizer state stay float32 (a bf16 LoRA run "
                               "holds its frozen base matrices in bfloat16). auto: bfloat16 where bf16 matmuls "
                               "are native (AMX / AVX512-BF16 CPUs, GPUs, TPUs), else float32; resolved when the "
                               "config is read, so the run records which")
    remat: Literal["none", "full", "dots"] = Field(
        "none", description="rematerialisation policy for transformer layers")
    scan_layers: bool = Field(
        False, description="run the transformer layers under one jax.lax.scan: one traced and compiled layer "
                           "body, same parameter tree and outputs (dropout masks are drawn differently)")
    attention: Literal["einsum", "xla", "cudnn"] = Field(
        "einsum", description="attention: einsum, or jax.nn.dot_product_attention's xla / cudnn (GPU flash "
                              "attention, bf16) kernel; steps that draw attention dropout use einsum")
    dropout: float | None = Field(None, ge=0, lt=1, description="override the checkpoint's dropout rates")

    @pydantic.field_validator("dtype")
    @classmethod
    def _host_dtype(cls, dtype: str) -> str:
        return auto_compute_dtype() if dtype == "auto" else dtype


class TaskConfig(Section):
    kind: TaskKind = Field(description="what the model is fine-tuned to do")
    pooling: Literal["cls", "mean", "last"] | None = Field(
        None, description="sequence pooling for classification/regression/embeddings; default per family")
    temperature: float = Field(0.05, gt=0, description="InfoNCE temperature (embedding task)")
    normalize: bool = Field(True, description="L2-normalise embeddings (embedding task)")
    max_new_tokens: int = Field(32, ge=1, description="greedy decoding length for generation metrics")
    generation_examples: int = Field(
        64, ge=0, description="prompt_completion examples decoded for BLEU/ROUGE per evaluation (0 = skip)")
    few_shot: int = Field(
        3, ge=0, description="k training examples in the prompt for the few-shot baseline (decoders)")


class TaskEntry(TaskConfig):
    """One named task of a staged run: the task fields, its data, and the metric R records."""
    data: DataConfig | None = Field(None, description="this task's data (train / validation / test); every kind "
                                                      "but lm_eval needs it")
    metric: str | None = Field(None, description="metric recorded in the accuracy matrix; null = the kind's default "
                                                 "(accuracy, f1, pearson, perplexity, recall@1; lm_eval: the first "
                                                 "task's first metric, named task/metric)")
    mode: Literal["max", "min"] | None = Field(None, description="whether a larger metric is better; null = the "
                                                                 "metric's own direction")
    tasks: list[str] | None = Field(None, min_length=1, description="lm_eval: the lm-eval tasks scored (e.g. the "
                                                                    "probes of data/probes: tenure_capitals_mc)")
    limit: int | None = Field(None, ge=1, description="lm_eval: documents per task at the start and stage ends "
                                                      "(R); null = all")
    eval_limit: int | None = Field(None, ge=1, description="lm_eval: documents per task on the eval cadence (the "
                                                           "curves): the eval_limit after R's first `limit`, held out "
                                                           "from R; null = not scored on the cadence")

    @model_validator(mode="after")
    def _lm_eval_or_data(self):
        if KINDS[self.kind].harness:
            if self.data is not None:
                raise ValueError("an lm_eval task reads its data through lm-eval (tasks, limit): remove its data")
            if not self.tasks:
                raise ValueError("an lm_eval task needs `tasks`, the lm-eval task names it scores")
            if self.eval_limit is not None and self.limit is None:
                raise ValueError("`eval_limit` needs `limit`: the eval cadence scores the documents after R's first "
                                 "`limit`, so that no curve reads a document R reports")
        else:
            if self.data is None:
                raise ValueError(f"a {self.kind} task needs `data`")
            for key in ("tasks", "limit", "eval_limit"):
                if getattr(self, key) is not None:
                    raise ValueError(f"`{key}` applies to kind lm_eval only, not {self.kind}")
        return self


class EarlyStoppingConfig(Section):
    patience: int = Field(0, ge=0, description="evaluations without improvement before stopping (0 = off)")
    min_delta: float = Field(0.0, ge=0, description="smallest change that counts as improvement")


class TrainConfig(Section):
    steps: int | None = Field(None, ge=1, description="optimizer steps; unset = data.num_epochs passes")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed for init, shuffling and dropout")
    log_every: int = Field(10, ge=1, description="steps between TensorBoard scalar writes")
    eval_every: int = Field(100, ge=1, description="steps between validation evaluations")
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    resume: bool = Field(True, description="resume from the newest good checkpoint in the run dir")


class EvalConfig(Section):
    metric: str = Field("accuracy", description="validation metric that picks the best checkpoint")
    mode: Literal["max", "min"] | None = Field(None, description="whether a larger metric is better; null = from "
                                               "the metric (min for loss, perplexity, mse; else max)")
    mixed_splits: bool = Field(
        False, description="a staged run's R columns normally all come from test splits (validation where no task "
                           "has one); true accepts test for some tasks and validation for others (forgetting.json "
                           "names each column's split)")
    baseline_cache: str | None = Field(
        None, description="a dir where runs share the starting model's scores (R's start row), keyed by the "
                          "starting weights' digest (LoRA's fresh adapters without their seed's random A), the "
                          "model, task and eval settings, and the labels each classifier may predict (`heads`; "
                          "a study's runs of one "
                          "pretrained LLM compute it once; runs of one host that start together wait for the first "
                          "instead of computing it too); null = every run computes its own")
    kl_to_start: bool = Field(
        False, description="also measure, at every eval, KL(start || now) on each trained task's own validation (else "
                           "test) inputs, averaged like its loss, and the backbone's L2 distance to the starting "
                           "weights (curves' kl_start and weight_distance, forgetting.json kl_to_start and "
                           "weight_distance, TensorBoard kl_start/<task> and weight_distance); costs a second "
                           "forward pass over those batches")


class WandbConfig(Section):
    project: str = Field(description="W&B project the run is logged to")
    mode: Literal["online", "offline"] = Field(
        "online", description="online: stream to the W&B server; offline: files under <run_dir>/wandb to `wandb sync`")


class LoggingConfig(Section):
    tensorboard: bool = Field(True, description="write TensorBoard event files under <run_dir>/tb")
    wandb: WandbConfig | None = Field(None, description="also log to Weights & Biases (the optional extra: "
                                                        "pip install -e '.[wandb]'); null = off")
    progress: bool = Field(True, description="show a progress bar (plain lines when not a TTY)")


class Config(Section):
    run_dir: str = Field("runs/default", min_length=1, description="where logs, checkpoints and the HF export go")
    branch_from: str | None = Field(
        None, description="a finished staged run whose stages are this config's first ones: start after them, "
                          "from its final checkpoint and history (engine/continual/branch.py)")
    model: ModelConfig
    task: TaskConfig | None = Field(None, description="the task of a single-task run (with `data`)")
    data: DataConfig | None = Field(None, description="the data of a single-task run")
    trainable: TrainableConfig = TrainableConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    divergence: DivergenceConfig = Field(
        DivergenceConfig(), description="the on-device guard against diverging updates (NaN/Inf, spikes, "
                                        "updates larger than the weights)")
    ewc: EWCConfig = Field(EWCConfig(), description="EWC defaults for every stage")
    l2sp: L2SPConfig = Field(L2SPConfig(), description="L2-SP defaults for every stage")
    replay: ReplayConfig = Field(ReplayConfig(), description="replay defaults for every stage")
    kl: KLConfig = Field(KLConfig(), description="distillation toward the starting model, defaults for every stage")
    method: Literal["sequential", "joint"] = Field(
        "sequential", description="sequential: each stage trains its own tasks; joint: each stage trains its own and "
                                  "every earlier stage's tasks in equal shares (one mean over the batch), the "
                                  "multi-task upper bound (R keeps its rows)")
    tasks: dict[str, TaskEntry] | None = Field(None, description="named tasks of a staged run")
    stages: list[StageConfig] | None = Field(None, description="stages trained in order; state carries over")
    heads: Literal["per_task", "shared"] = Field(
        "per_task", description="per_task: each task scores only its own labels (task-incremental); shared: one "
                                "classifier over the labels of every task trained so far (class-incremental)")

    @field_validator("run_dir", "branch_from")
    @classmethod
    def _home(cls, path: str | None) -> str | None:  # `~/runs/x`, as a shell would read it
        return None if path is None else os.path.expanduser(path)


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise TenureError(f"override {text!r}: expected key.sub=value")
    try:
        value = yamlfile.load(raw) if raw else ""
    except yaml.constructor.ConstructorError as exc:  # a key written twice: YAML, but ambiguous
        raise TenureError(f"override {text!r}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        if raw.lstrip()[:1] in "[{\"'":  # meant as a list, mapping or quoted string: taking it literally would hide the typo
            problem = str(getattr(exc, "problem", None) or exc).strip().splitlines()[0]
            raise TenureError(f"override {text!r}: invalid YAML ({problem})") from None
        value = raw  # not YAML (a path with ': ' or a leading '*'): keep the literal string
    return key.split("."), value


def _set_path(tree: dict, keys: list[str], value: Any, where: str) -> None:
    """Sets tree[k0][k1]...; a numeric key indexes a list (`stages.1.steps=200`)."""
    node = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise TenureError(f"{where}: '{'.'.join(keys[:i])}' has {len(node)} items, no item {key!r}")
            key = int(key)
        elif not isinstance(node, dict):
            raise TenureError(f"{where}: '{'.'.join(keys[:i])}' is a value, not a section")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown config key '{key}'"
    if kind == "missing":
        return f"missing config key '{key}'"
    return f"config key '{key}': {error['msg'].removeprefix('Value error, ')} (got {error.get('input')!r})"


def _leaf_types(annotation) -> list:
    """The alternatives of an annotation: `int | None` -> [int, NoneType]."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _leaf_types(arg)]
    return [annotation]


def _reject_bools(annotation, value: Any, where: str, source: str) -> None:
    """pydantic's lax mode reads `true` as 1 for an int or float field (`train.steps=true`):
    refuse a boolean wherever the field is a number and not also a bool. Walks sections,
    lists and dicts of sections, so sections added later are covered too."""
    alternatives = _leaf_types(annotation)
    if isinstance(value, bool):
        if bool not in alternatives and any(t in (int, float) for t in alternatives):
            kind = "an integer" if int in alternatives else "a number"
            raise TenureError(f"{source}: config key '{where}': expected {kind}, got a boolean "
                              f"({str(value).lower()})")
        return
    for alt in alternatives:
        origin, args = typing.get_origin(alt), typing.get_args(alt)
        if isinstance(alt, type) and issubclass(alt, BaseModel) and isinstance(value, dict):
            for name, field in alt.model_fields.items():
                for key in dict.fromkeys((field.alias or name, name)):  # as written: `ewc.lambda` is field `lam`
                    if key in value:
                        _reject_bools(field.annotation, value[key], f"{where}.{key}" if where else key, source)
        elif origin in (list, tuple) and isinstance(value, (list, tuple)) and args:
            for i, item in enumerate(value):
                arg = args[0] if origin is list or (len(args) == 2 and args[1] is Ellipsis) else (
                    args[i] if i < len(args) else None)
                if arg is not None:
                    _reject_bools(arg, item, f"{where}.{i}", source)
        elif origin is dict and isinstance(value, dict) and len(args) == 2:
            for key, item in value.items():
                _reject_bools(args[1], item, f"{where}.{key}", source)


def _reject_non_finite(node: Any, where: str, source: str) -> None:
    """NaN and Inf are never meaningful config values (`optim.lr=inf`, `.nan`, "inf")."""
    if isinstance(node, float) and not math.isfinite(node):
        raise TenureError(f"{source}: config key '{where}': expected a finite number, got {node}")
    if isinstance(node, BaseModel):
        for name in type(node).model_fields:
            _reject_non_finite(getattr(node, name), f"{where}.{name}" if where else name, source)
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            _reject_non_finite(item, f"{where}.{i}", source)
    elif isinstance(node, dict):
        for key, item in node.items():
            _reject_non_finite(item, f"{where}.{key}", source)


def one_line(exc: pydantic.ValidationError, source: str, describe) -> TenureError:
    """The first validation error as one line (`describe(error)`), with how many more there are."""
    errors = exc.errors()
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return TenureError(f"{source}: {describe(errors[0])}{more}")


def read_yaml_mapping(path: pathlib.Path, what: str, holds: str) -> dict:
    """The YAML mapping in `path`; a missing file, bad YAML (with its line) or a non-mapping is one line."""
    if path.is_dir():
        raise TenureError(f"{what} {path} is a directory; give the YAML file")
    if not path.is_file():
        raise TenureError(f"{what} not found: {path}")
    try:
        tree = yamlfile.load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError:
        raise TenureError(f"{path}: not a text file (binary content), expected YAML") from None
    except OSError as exc:
        raise TenureError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = str(getattr(exc, "problem", None) or exc).strip().splitlines()[0]
        raise TenureError(f"{path}{line}: invalid YAML ({problem})") from None
    if not isinstance(tree, dict):
        raise TenureError(f"{path}: expected a mapping of {holds} at the top level")
    return tree


def validate(tree: dict, source: str = "config") -> Config:
    _reject_bools(Config, tree, "", source)
    try:
        cfg = Config.model_validate(tree)
    except pydantic.ValidationError as exc:
        raise one_line(exc, source, _describe) from None
    _reject_non_finite(cfg, "", source)
    try:
        plan(cfg)  # the sections that only make sense together (tasks, stages, their names), resolved once
    except TenureError as exc:
        raise TenureError(f"{source}: {exc}") from None
    return cfg


def _unshared(node: Any) -> Any:
    """A copy with no node reached twice: a YAML anchor's aliases (`data: *d`) are one object, so an
    override of one task's key would change every task sharing it."""
    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unshared(v) for v in node]
    return node


def config_tree(path: str | pathlib.Path, overrides: list[str] = ()) -> dict:
    """The YAML at `path` with `key.sub=value` overrides applied, not yet validated."""
    tree = _unshared(read_yaml_mapping(pathlib.Path(path), "config file", "sections"))
    for text in overrides:
        keys, value = _parse_override(text)
        _set_path(tree, keys, value, f"override {text!r}")
    return tree


def load_config(path: str | pathlib.Path, overrides: list[str] = ()) -> Config:
    """Reads YAML at `path`, applies `key.sub=value` overrides, validates."""
    return validate(config_tree(path, overrides), str(path))


def to_dict(cfg: Config) -> dict:
    """JSON-ready dict of the full config, defaults included (saved with checkpoints)."""
    return cfg.model_dump(mode="json", by_alias=True)


def given(cfg: Config) -> dict:
    """JSON-ready dict of the keys the config set (saved with checkpoints as `config_given`):
    a section is on when its strength is set, even to its default (`ewc.lambda: 0`), which the full
    dict cannot tell; `validate(given(cfg))` is `cfg` again, with the same keys set."""
    return cfg.model_dump(mode="json", by_alias=True, exclude_unset=True)


def saved_config(extras: dict, source: str) -> Config:
    """The config a checkpoint was trained with, from its extras. A checkpoint written before
    `config_given` existed carries only the full dict, every default written out: it is read
    without the values equal to their defaults, so the sections it switched on by setting them
    read as they did (an explicit default, such as `ewc.lambda: 0`, reads as unset there)."""
    if "config_given" in extras:
        return validate(extras["config_given"], source)
    full = validate(as_today(extras["config"]), source)
    return validate(full.model_dump(mode="json", by_alias=True, exclude_defaults=True), source)


def as_today(saved: dict) -> dict:
    """A checkpoint's config read by today's schema: keys added to the engine since it was
    written take their defaults (what that run did), so they are not changes on resume. A config
    today's schema rejects is returned as it was (every difference then shows)."""
    try:
        return to_dict(Config.model_validate(_with_former_meanings(saved)))
    except pydantic.ValidationError:
        return saved


def _with_former_meanings(saved: dict) -> dict:
    """Keys added with a default that changed what an older config did are set to the old
    behaviour: a replay section saved before `replay.loss` existed trained with the separate
    loss, so resuming it under today's default shows as a change instead of silently switching."""
    def former(replay):
        if isinstance(replay, dict) and "loss" not in replay and (replay.get("ratio") or 0) > 0:
            return {**replay, "loss": "separate"}
        return replay
    if not isinstance(saved, dict):
        return saved
    saved = dict(saved)
    if "replay" in saved:
        saved["replay"] = former(saved["replay"])
    if isinstance(saved.get("stages"), list):
        saved["stages"] = [{**s, "replay": former(s["replay"])} if isinstance(s, dict) and "replay" in s else s
                           for s in saved["stages"]]
    return saved
