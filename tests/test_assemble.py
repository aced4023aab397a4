"""One assembly of the train step: `tenure compile` (abstract params, state and batch) and
`tenure bench` (synthetic batches) lower exactly the step `tenure train` runs, compared as
lowered StableHLO text on tiny configs; and a real training batch has the fields, shapes and
dtypes of the batch contract (tenure.engine.data.batch_spec)."""
import itertools
import json
import pathlib
import re

import jax
import numpy as np
import yaml

from tenure.engine.train.assemble import abstract_step
from tenure.engine.tools.bench_setup import BenchConfig, build_bench
from tenure.engine.config.schema import load_config
from tenure.engine.data.pipeline import to_global_batch
from tenure.engine.train.trainer import Trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, ROWS, LENGTH = 5, 8, 32


def _config(tmp_path, model: str, kind: str, records, overrides=()) -> tuple:
    data = {}
    for split in ("train", "validation"):
        data[split] = str(tmp_path / f"{split}.jsonl")
        pathlib.Path(data[split]).write_text("".join(json.dumps(r) + "\n" for r in records))
    tree = {"run_dir": str(tmp_path / "run"), "model": {"path": str(ROOT / "tests/fixtures" / model)},
            "task": {"kind": kind},
            # one length bucket: every real batch is max_length wide, as the abstract one is
            "data": {**data, "max_length": LENGTH, "length_buckets": [LENGTH], "batch_size": ROWS},
            "optim": {"name": "adamw", "lr": 1e-3, "schedule": "linear", "warmup_ratio": 0.2},
            "train": {"steps": STEPS},
            "eval": {"metric": "accuracy", "mode": "max"} if kind == "seq_cls" else {"metric": "perplexity", "mode": "min"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path, load_config(path, list(overrides))


def hlo(lowered) -> str:
    """The lowered module's text with its function symbols numbered by first appearance: jax
    suffixes private functions (`@_where_4`) with a process-wide counter, so the same program
    lowered twice can differ in those suffixes alone."""
    names: dict[str, str] = {}
    return re.sub(r"@([\w.$-]+)", lambda m: "@" + names.setdefault(m.group(1), f"f{len(names)}"), lowered.as_text())


def _glosses(n=48):
    return [json.loads(line) for line in itertools.islice(open(ROOT / "data/wordnet_lexnames/train.jsonl"), n)]


def _train_lowering(cfg):
    """(StableHLO of the step `tenure train` runs in stage 1 on its first batch, that batch, labels)."""
    trainer = Trainer(cfg)
    sr = trainer.build(0, trainer.start_params, {})
    batch = sr.train_iter.peek()
    sr.train_iter.close()
    labels = len(trainer.tasks.label_vocab) if trainer.tasks.label_vocab else 2
    # as the fit loop calls it: the host batch made a global array (tenure.engine.train.fit)
    return hlo(sr.step_fn.lower(sr.state, to_global_batch(batch, trainer.backbone.mesh))), batch, labels


def _check_compile_path(cfg):
    train_text, batch, labels = _train_lowering(cfg)
    built = abstract_step(cfg, jax.devices(), num_labels=labels)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves((built.step.state, built.batch)))
    # The featurizer's real batch has the contract's fields, shapes and dtypes.
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in batch.items()} == \
        {k: (v.shape, np.dtype(v.dtype)) for k, v in built.batch.items()}
    compile_text = hlo(built.step.step_fn.lower(built.step.state, built.batch))
    assert "stablehlo" in train_text and compile_text == train_text
    return train_text, labels, built


def test_compile_and_bench_lower_the_train_step_of_a_classifier(tmp_path):
    path, cfg = _config(tmp_path, "bert/seq_cls", "seq_cls", _glosses())
    train_text, labels, _ = _check_compile_path(cfg)
    # bench: its schedule's length (warmup + (steps + 1) x rounds) set to the run's, its batch shape.
    bench = BenchConfig(batch_size=ROWS, length=LENGTH, warmup=0, steps=STEPS - 1, rounds=1, num_labels=labels)
    assert bench.total_steps == STEPS
    b = build_bench(cfg, bench, path)
    assert hlo(b.step_fn.lower(b.state, b.device_batches()[0])) == train_text


def test_compile_lowers_the_train_step_of_a_bf16_lora_causal_lm_with_l2sp(tmp_path):
    """LoRA with its frozen base in bf16 (tenure.engine.train.frozen_base), and a regulariser in the first stage
    (its anchor lives in the train state)."""
    _, cfg = _config(tmp_path, "gpt2", "causal_lm", [{"text": r["text"]} for r in _glosses()],
                     ("trainable.mode=lora", "trainable.lora.targets=[c_attn_q,c_attn_v]", "model.dtype=bfloat16",
                      "l2sp.alpha=0.01"))
    _, _, built = _check_compile_path(cfg)
    assert set(built.step.state.extra) == {"l2sp", "divergence"} and "l2sp" in built.step.losses
    dtypes = {x.dtype for x in jax.tree.leaves(built.step.state.params)}
    assert dtypes == {np.dtype("float32"), np.dtype("bfloat16")}


def test_compile_lowers_the_train_step_of_a_class_incremental_stage(tmp_path):
    """A staged run's first stage: examples carry task_id, the shared head masks the labels of
    tasks not trained yet; compile takes each task's labels from its data.labels."""
    glosses = [json.loads(line) for line in itertools.islice(open(ROOT / "data/wordnet_lexnames/train.jsonl"), 400)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in glosses))
    data = {"train": str(path), "validation": str(path), "max_length": LENGTH, "length_buckets": [LENGTH],
            "batch_size": ROWS}
    tree = {"run_dir": str(tmp_path / "run"), "model": {"path": str(ROOT / "tests/fixtures/bert/seq_cls")},
            "heads": "shared",
            "tasks": {"A": {"kind": "seq_cls", "data": {**data, "labels": ["noun.plant", "noun.animal"]}},
                      "B": {"kind": "seq_cls", "data": {**data, "labels": ["noun.artifact", "noun.person"]}}},
            "stages": [{"tasks": ["A"], "steps": STEPS}, {"tasks": ["B"], "steps": STEPS}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    cfg = load_config(tmp_path / "run.yaml", [])
    _, _, built = _check_compile_path(cfg)
    a, b = ["noun.plant", "noun.animal"], ["noun.artifact", "noun.person"]
    own = tuple(label in a for label in sorted(a + b))  # the run's vocabulary is sorted; only A trained yet
    assert "task_id" in built.batch and built.step.model.label_masks == (own, own)
