"""Which params train, and at what relative learning rate: one spec, compiled to optax labels.

Params are addressed by "/"-joined paths, e.g. "backbone/layers_3/attention/query/kernel".
The stages of the backbone are [embeddings, layers_0, ..., layers_{L-1}]; everything after
them (final_norm, head) is the top.

Rules, in order:
1. `mode` picks the base set: full (all), head (none of the backbone), last_n (layers
   L-K..L-1 and final_norm), bitfit (leaves named `bias`), lora (leaves `lora_a`/`lora_b`),
   regex (none: `include` decides).
2. `train_head` adds every param under `head`.
3. `include` regexes add params, then `exclude` regexes remove them (re.search on the path).
A regex, or a LoRA target, that matches nothing is refused (`first_unmatched`).

Layer-wise LR decay (`llrd.decay = d`, L layers): layers_l gets d**(L-l) (the top layer d**1),
embeddings d**(L+1), final_norm and head d**0 = 1. Without llrd every trainable param is in
one group "trainable" with multiplier 1.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

import jax
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tenure.models.errors import TenureError

FROZEN = "frozen"
_LAYER_RE = re.compile(r"(?:^|/)layers_(\d+)(?:/|$)")


class LLRDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    decay: float = Field(0.9, gt=0, le=1, description="layer l of L gets lr * decay**(L-l); embeddings decay**(L+1)")


class LoRAConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(8, ge=1, description="adapter rank r")
    alpha: float = Field(16.0, gt=0, description="adapter scale is alpha / rank")
    targets: list[str] = Field(["query", "value"], description="Dense module names that get adapters")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input while training")


class TrainableConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["full", "head", "last_n", "bitfit", "lora", "regex"] = Field(
        "full", description="base set of trainable params (see engine/train/trainability.py)")
    last_n: int = Field(1, ge=0, description="mode=last_n: number of top layers to train")
    train_head: bool = Field(True, description="the task head trains in every mode (unless excluded)")
    include: list[str] = Field([], description="regexes over '/'-joined param paths to make trainable")
    exclude: list[str] = Field([], description="regexes over param paths to freeze (applied last)")
    llrd: LLRDConfig | None = Field(None, description="layer-wise LR decay; None = one LR for all")
    lora: LoRAConfig = Field(LoRAConfig(), description="adapter shape; used when mode=lora")

    @field_validator("include", "exclude")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad regex {pattern!r}: {exc}") from None
        return patterns


@dataclasses.dataclass(frozen=True)
class Trainability:
    labels: Any                      # pytree like params: FROZEN or a group name per leaf
    lr_multipliers: dict[str, float]  # group name -> LR multiplier
    frozen_prefix: int               # leading backbone stages with no trainable leaf
    num_stages: int                  # L + 1 (embeddings + layers)
    trainable_count: int
    frozen_count: int

    @property
    def trainable_mask(self) -> Any:
        return jax.tree.map(lambda label: label != FROZEN, self.labels)

    def summary(self) -> str:
        total = self.trainable_count + self.frozen_count
        share = 100.0 * self.trainable_count / max(total, 1)
        groups = ", ".join(f"{g}x{m:.4g}" for g, m in self.lr_multipliers.items())
        return (f"trainable {self.trainable_count:,}/{total:,} params ({share:.2f}%), "
                f"forward-only stages {self.frozen_prefix}/{self.num_stages}, lr groups: {groups}")


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def stage_of(path: str) -> int | None:
    """0 for embeddings, l+1 for layers_l, None outside the backbone stages."""
    if not path.startswith("backbone/"):
        return None
    match = _LAYER_RE.search(path)
    if match:
        return int(match.group(1)) + 1
    return 0 if path.startswith("backbone/embeddings/") else None


def _base_trainable(path: str, cfg: TrainableConfig, num_layers: int) -> bool:
    leaf = path.rsplit("/", 1)[-1]
    in_backbone = path.startswith("backbone/")
    if cfg.mode == "full":
        return True
    if cfg.mode == "last_n":
        stage = stage_of(path)
        if stage is None:  # final_norm sits above the top layer
            return in_backbone and cfg.last_n > 0
        return stage > num_layers - cfg.last_n
    if cfg.mode == "bitfit":
        return leaf == "bias"
    if cfg.mode == "lora":
        return leaf in ("lora_a", "lora_b")
    return False  # head, regex


def _group(path: str, cfg: TrainableConfig, num_layers: int) -> tuple[str, float]:
    if cfg.llrd is None:
        return "trainable", 1.0
    stage = stage_of(path)
    if stage is None:
        return "top", 1.0
    name = "embeddings" if stage == 0 else f"layers_{stage - 1}"
    return name, cfg.llrd.decay ** (num_layers + 1 - stage)


def first_unmatched(params: Any, cfg: TrainableConfig) -> tuple[str, str] | None:
    """(key under `trainable`, problem) of the first include/exclude regex that matches no param path,
    or (mode=lora) LoRA target that names no linear layer of the backbone: either would silently
    train something else (only the head, or what was meant to be frozen); None if all match."""
    paths = [path_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for name in ("include", "exclude"):
        for pattern in getattr(cfg, name):
            if not any(re.search(pattern, p) for p in paths):
                example = next((p for p in paths if p.endswith("/kernel")), paths[0])
                return name, f"{pattern!r} matches no parameter path (paths look like {example!r})"
    if cfg.mode == "lora":
        # Adapters sit on the backbone's Dense layers (the heads take none): the module names over a kernel.
        linear = dict.fromkeys(p.split("/")[-2] for p in paths if p.startswith("backbone/") and p.endswith("/kernel"))
        for target in cfg.lora.targets:
            if target not in linear:
                return "lora.targets", (f"{target!r} matches no linear layer of the model "
                                        f"(its linear layers: {', '.join(linear)})")
    return None


def compile_trainability(params: Any, cfg: TrainableConfig, num_layers: int) -> Trainability:
    """Labels every param leaf FROZEN or with its LR group; counts; the forward-only prefix."""
    if cfg.mode == "last_n" and cfg.last_n > num_layers:
        raise TenureError(f"config key 'trainable.last_n': {cfg.last_n} > the model's {num_layers} layers")
    include = [re.compile(p) for p in cfg.include]
    exclude = [re.compile(p) for p in cfg.exclude]
    multipliers: dict[str, float] = {}
    stage_trains = [False] * (num_layers + 1)
    counts = {"trainable": 0, "frozen": 0}

    def label(path, leaf) -> str:
        p = path_str(path)
        trains = _base_trainable(p, cfg, num_layers)
        trains |= cfg.train_head and p.startswith("head/")
        trains |= any(r.search(p) for r in include)
        trains &= not any(r.search(p) for r in exclude)
        counts["trainable" if trains else "frozen"] += int(np.prod(np.shape(leaf)))
        if not trains:
            return FROZEN
        stage = stage_of(p)
        if stage is not None:
            stage_trains[stage] = True
        group, mult = _group(p, cfg, num_layers)
        multipliers[group] = mult
        return group

    labels = jax.tree_util.tree_map_with_path(label, params)
    if not multipliers:
        raise TenureError(f"config section 'trainable' (mode={cfg.mode}): no parameter is trainable")
    frozen_prefix = next((i for i, t in enumerate(stage_trains) if t), num_layers + 1)
    return Trainability(labels=labels, lr_multipliers=dict(sorted(multipliers.items())),
                        frozen_prefix=frozen_prefix, num_stages=num_layers + 1,
                        trainable_count=counts["trainable"], frozen_count=counts["frozen"])
