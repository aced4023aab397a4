"""What `tenure bench` times: the model, optimizer and train step of a config, on fixed-shape
batches (synthetic or real), and the model-FLOPs formula.

  BenchConfig        the `bench:` section of a bench YAML (shapes, steps, data source)
  build_bench(cfg, bench) -> Bench   model, state, jitted step and batches
  model_flops(...)   6 x non-embedding params x tokens + the attention term, adjusted for frozen
                     stages (forward-only) and frozen weights (no weight gradient)

The step is `tenure train`'s, assembled by the same functions (tenure.engine.train.assemble.bench_step, on
tenure.engine.train.build), with weights read only for model.init=pretrained and no data read for synthetic
batches, so a random-init benchmark needs nothing but a config.json.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tenure.engine.runtime import sharding
from tenure.engine.train.assemble import bench_step
from tenure.engine.config.schema import Config
from tenure.engine.data.batch_spec import IGNORE, batch_fields, field_shapes
from tenure.engine.train.step import TrainState
from tenure.engine.train.trainability import path_str, stage_of
from tenure.engine.runtime.xla_env import compiler_options
from tenure.models.errors import TenureError
from tenure.models.hf import load_hf, read_config, resolve_model_dir
from tenure.models.positions import check_max_length
from tenure.engine.tasks.kinds import KINDS


class BenchConfig(BaseModel):
    """The `bench:` section (override with bench.key=value).

    Each side (tenure, every --ab variant, PyTorch with --compare torch) runs `warmup` untimed
    steps, then `rounds` blocks, alternating sides block by block (A B torch A B torch ...).
    A block is `steps` + 1 consecutive steps of one side, as in a user's training loop; its
    first step is run but not timed (it pays for the switch from the other side: woken
    threads, cold caches), so a side's figures come from `rounds` x `steps` timed steps."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(32, ge=1, description="rows per step")
    length: int = Field(128, ge=2, description="tokens per row (every batch is padded to this)")
    data: Literal["synthetic", "real"] = Field(
        "synthetic", description="seeded random tokens, or data.train through the pipeline")
    real_tokens: float = Field(1.0, gt=0, le=1, description="synthetic: share of each row that is real tokens")
    num_labels: int = Field(2, ge=1, description="synthetic classification: number of classes")
    mlm_probability: float = Field(0.15, gt=0, le=1, description="synthetic MLM: share of real tokens labelled")
    warmup: int = Field(2, ge=0, description="untimed steps after compiling, before the first block")
    steps: int = Field(3, ge=1, description="timed steps per block (each block runs one more step first, untimed)")
    rounds: int = Field(3, ge=1, description="blocks per side (with --compare torch or --ab: A B A B ...)")
    batches: int = Field(4, ge=1, description="distinct batches cycled through")
    onednn: bool | None = Field(None, description="CPU: compile the step with the oneDNN dot path (true) or XLA's "
                                "default dots (false); unset: the engine's choice for the dtype and CPU (engine/runtime/xla_env)")

    @property
    def total_steps(self) -> int:
        """Steps each side runs: warm-up, then `rounds` blocks of `steps` + 1 (the schedule's length)."""
        return self.warmup + (self.steps + 1) * self.rounds


@dataclasses.dataclass
class Bench:
    cfg: Config
    bench: BenchConfig
    model_dir: Path
    arch: Any
    kind: str
    model: Any
    trainability: Any
    state: TrainState
    step_fn: Any
    batches: list[dict]
    num_labels: int
    onednn: bool  # the dot path the step was compiled with
    mesh: Any

    def device_batches(self) -> list[dict]:
        """The batches as the train loop feeds them: global arrays sharded over the batch axes."""
        from tenure.engine.data.pipeline import to_global_batch
        return [to_global_batch(batch, self.mesh) for batch in self.batches]


def synthetic_batches(bench: BenchConfig, kind: str, vocab_size: int, seed: int = 0, fmt: str | None = None
                      ) -> list[dict]:
    """Batches with the fields of a training batch (tenure.engine.data.batch_spec): seeded ids in
    [4, vocab) (never the usual special ids), right padding to `length`. Causal LM labels are the
    ids; MLM labels a seeded `bench.mlm_probability` of the real tokens (the inputs are left
    unmasked: the step's cost does not depend on which ids it reads); classes lie below
    `bench.num_labels`."""
    fields = batch_fields(kind, fmt)
    rng = np.random.default_rng(seed)
    rows, length = bench.batch_size, bench.length
    real = max(2, int(round(bench.real_tokens * length)))
    out = []
    for _ in range(bench.batches):
        mask = np.zeros((rows, length), np.int32)
        mask[:, :real] = 1
        ids = np.where(mask == 1, rng.integers(4, vocab_size, (rows, length)), 0).astype(np.int32)
        batch = {}
        for name, (shape, dtype) in field_shapes(fields, examples=rows, length=length).items():
            if name == "input_ids":
                batch[name] = ids
            elif name == "attention_mask":
                batch[name] = mask
            elif name == "example_mask":
                batch[name] = np.ones(shape, dtype)
            elif name == "token_type_ids":
                batch[name] = np.zeros(shape, dtype)
            elif name == "labels":
                batch[name] = KINDS[kind].synthetic_labels(shape, dtype, ids, mask, rng, bench.num_labels,
                                                           bench.mlm_probability)
            else:
                raise TenureError(f"bench.data=synthetic: task kind {kind!r} has field {name!r}, which synthetic "
                                  "batches do not make; use bench.data=real")
        out.append(batch)
    return out


def real_batches(cfg: Config, bench: BenchConfig, tokenizer) -> tuple[list[dict], int | None]:
    """The first `bench.batches` training batches, all padded to `bench.length`."""
    from tenure.engine.data.pipeline import build_label_vocab, build_train_iterator
    if tokenizer is None:
        raise TenureError("bench.data=real needs a tokenizer in the model directory")
    data = cfg.data.model_copy(update={"max_length": bench.length, "length_buckets": [bench.length],
                                       "batch_size": bench.batch_size})
    vocab = build_label_vocab(data, cfg.task.kind)
    shape = sharding.mesh_shape(cfg.mesh, jax.device_count())  # packed batches keep rows divisible by the shards
    it = iter(build_train_iterator(data, cfg.task.kind, tokenizer, vocab, seed=cfg.train.seed,
                                   batch_shards=max(1, shape[0] * shape[1] // jax.process_count()),
                                   accum_steps=cfg.optim.grad_accum_steps))
    return [next(it) for _ in range(bench.batches)], (len(vocab) if vocab is not None else None)


def resolve_dir(path: str, config_path: Path) -> Path:
    """model.path as given, or relative to the bench YAML's directory."""
    beside = (config_path.parent / path)
    if not Path(path).expanduser().is_dir() and beside.is_dir():
        return beside.resolve()
    return resolve_model_dir(path)


def check_length(cfg: Config, bench: BenchConfig, config_path: Path) -> str | None:
    """Refuses a bench.length past the model's position table, as training refuses such a
    data.max_length (past it the embedding gather reads NaN: not the model's step); returns the
    warning past a RoPE model's trained context. Reads config.json only."""
    arch = load_hf(resolve_dir(cfg.model.path, config_path), with_tokenizer=False, with_weights=False)[0]
    return check_max_length(arch, bench.length, key="bench.length")


def build_bench(cfg: Config, bench: BenchConfig, config_path: Path) -> Bench:
    model_dir = resolve_dir(cfg.model.path, config_path)
    kind = cfg.task.kind
    num_labels = bench.num_labels
    if bench.data == "real":
        from tenure.models.hf import load_tokenizer
        batches, vocab_size = real_batches(cfg, bench, load_tokenizer(model_dir))
        num_labels = vocab_size or num_labels
    else:
        vocab = read_config(model_dir)["vocab_size"]
        batches = synthetic_batches(bench, kind, vocab, seed=cfg.train.seed, fmt=cfg.data.format)
    total = bench.total_steps
    xla_options = compiler_options(dtype=cfg.model.dtype, onednn=bench.onednn)
    step, backbone = bench_step(cfg, model_dir, batches[0], num_labels=num_labels, steps=total,
                                xla_options=xla_options)
    return Bench(cfg, bench, model_dir, backbone.arch, kind, step.model, step.trainability, step.state, step.step_fn,
                 batches, num_labels, bool(xla_options), backbone.mesh)


def _dims(arch) -> tuple[int, int, int]:
    """(layers, hidden size, vocab size) of any family config."""
    layers = getattr(arch, "num_layers")
    hidden = getattr(arch, "hidden_size")
    return layers, hidden, arch.vocab_size


def model_flops(arch, params, trainability, kind: str, batch_size: int, length: int) -> dict[str, float]:
    """Model FLOPs of one training step at `batch_size` x `length` padded tokens T.

    N = non-embedding params (every param outside backbone/embeddings, the task head included).
      forward                     2 N T + attention 4 layers L d T
      backward, activations       2 N_above T + 8 layers_above L d T  (stages above the frozen prefix)
      backward, weight gradients  2 N_trainable T
    Full fine-tuning gives 6 N T + 12 layers L d T (the PaLM formula). A tied LM head adds
    2 V d T per pass that applies (forward, activations, and weights when embeddings train)."""
    tokens = batch_size * length
    layers, hidden, vocab = _dims(arch)
    frozen_prefix = trainability.frozen_prefix
    n_all = n_above = n_trainable = 0
    for (path, leaf), trains in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                    jax.tree.leaves(trainability.trainable_mask)):
        p = path_str(path)
        stage = stage_of(p)
        if stage == 0:
            continue
        size = int(np.prod(leaf.shape))
        n_all += size
        if stage is None or stage >= frozen_prefix:
            n_above += size
        if trains:
            n_trainable += size
    layers_above = sum(1 for layer in range(layers) if layer + 1 >= frozen_prefix)
    attn = 4 * length * hidden * tokens
    flops = {"dense": 2.0 * tokens * (n_all + n_above + n_trainable),
             "attention": float(attn * layers + 2 * attn * layers_above)}
    paths = [path_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if KINDS[kind].vocab_head and not any("/lm_head/" in p for p in paths):
        embeddings_train = any(t for p, t in zip(paths, jax.tree.leaves(trainability.trainable_mask))
                               if stage_of(p) == 0)
        flops["lm_head"] = 2.0 * vocab * hidden * tokens * (2 + int(embeddings_train))
    flops["total"] = sum(flops.values())
    flops["non_embedding_params"] = float(n_all)
    return flops
