"""A LoRA run's frozen base (engine/train/frozen_base.py): bfloat16 in the train state, and left out of
checkpoints, coming back from the model directory.

In-process, on the tiny BERT fixture: the dtypes of a bf16 LoRA state, and its train steps against
those of an fp32 base. Through the CLI, on a widened copy of that fixture (hidden 128, so that the
arrays, not orbax's per-leaf metadata, make up a checkpoint): checkpoint bytes and contents, exact
resume, export from a checkpoint, the refusal of a changed model directory, and a staged
full-then-LoRA run, whose checkpoints keep the base its first stage trained."""
import itertools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file, save_file

from tenure.engine.train.build import build_stage, init_params, kept_head
from tenure.engine.config.schema import load_config
from tenure.engine.data.pipeline import to_global_batch
from tenure.engine.continual.fisher import prune
from tenure.engine.train.frozen_base import weights_fingerprint
from tenure.engine.train.optim import build_schedule
from tenure.engine.train.step import make_train_step
from tenure.engine.train.params import to_host
from tenure.engine.train.trainer import Trainer
from tenure.engine.train.trainability import path_str
from tenure.engine.runtime.xla_env import compiler_options
from tenure.models.hf import load_hf
from tests.cli_helpers import tenure

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_BERT = ROOT / "tests/fixtures/bert/seq_cls"
LORA = ("trainable.mode=lora", "model.dtype=bfloat16")
ADAPTED = {f"backbone/layers_{i}/attention/{m}/{leaf}" for i in range(2) for m in ("query", "value")
           for leaf in ("lora_a", "lora_b")}
HEAD = {"head/classifier/bias", "head/classifier/kernel", "head/pooler/dense/bias", "head/pooler/dense/kernel"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    out = {}
    for split, rows in (("train", 2000), ("validation", 100), ("test", 100)):
        out[split] = d / f"{split}.jsonl"
        out[split].write_text("".join(itertools.islice(open(ROOT / f"data/wordnet_lexnames/{split}.jsonl"), rows)))
    return out


@pytest.fixture(scope="module")
def wide_bert(tmp_path_factory) -> pathlib.Path:
    """The tiny BERT fixture at hidden 128 / intermediate 512 (same tokenizer), seeded weights."""
    out = tmp_path_factory.mktemp("wide_bert")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_BERT / name, out / name)
    config = json.loads((TINY_BERT / "config.json").read_text())
    config.update(hidden_size=128, intermediate_size=512)
    (out / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    tensors = {}
    for name, value in load_file(str(TINY_BERT / "model.safetensors")).items():
        shape = tuple({32: 128, 64: 512}.get(d, d) for d in value.shape)
        if name.endswith("LayerNorm.weight"):
            tensors[name] = np.ones(shape, np.float32)
        elif name.endswith("bias"):
            tensors[name] = np.zeros(shape, np.float32)
        else:
            tensors[name] = rng.normal(0.0, 0.05, shape).astype(np.float32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out




def quickstart_args(model, data, *extra):
    return [f"model.path={model}", f"data.train={data['train']}", f"data.validation={data['validation']}",
            f"data.test={data['test']}", "data.max_length=32", "data.batch_size=8", "data.eval_batch_size=32",
            "optim.schedule=constant", "optim.warmup_ratio=0", "optim.lr=1e-3", "logging.progress=false", *extra]


def train(run_dir, model, data, steps, *extra, check=True):
    return tenure("train", "configs/tasks/seq_cls.yaml", f"run_dir={run_dir}", f"train.steps={steps}",
                  "train.eval_every=4", "checkpoint.every_steps=4", "checkpoint.keep=5",
                  *quickstart_args(model, data, *extra), check=check)


def saved_arrays(step_dir: pathlib.Path) -> dict[str, str]:
    """Param path -> dtype of every param array a checkpoint step holds."""
    tree = ocp.StandardCheckpointer().metadata(step_dir / "state").item_metadata["params"]
    return {path_str(path): str(meta.dtype) for path, meta in jax.tree_util.tree_flatten_with_path(tree)[0]}


def disk_bytes(directory: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def weights(run_dir: pathlib.Path) -> bytes:
    return (run_dir / "hf" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, wide_bert, data):
    run_dir = tmp_path_factory.mktemp("lora")
    train(run_dir, wide_bert, data, 8, *LORA)
    return run_dir


def _steps(stage_run, state, batches, mesh, xla_options):
    """Losses and trained leaves (host copies) after the stage's train step runs `batches` from `state`."""
    step = make_train_step(stage_run.model, stage_run.losses, stage_run.tx, mesh, stage_run.state_shardings,
                           lr_schedule=build_schedule(stage_run.stage.optim, stage_run.steps),
                           trainable_mask=stage_run.trainability.trainable_mask, xla_options=xla_options)
    state = jax.tree.map(jnp.copy, state)  # the step donates its state
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, prune(state.params, stage_run.trainability.trainable_mask))


def test_bf16_lora_state_holds_the_frozen_matrices_in_bf16(data, tmp_path):
    cfg = load_config("configs/tasks/seq_cls.yaml", [f"run_dir={tmp_path}", *quickstart_args(TINY_BERT, data, *LORA)])
    trainer = Trainer(cfg)
    bf16 = trainer.build(0, trainer.start_params, {})
    dtypes = {path_str(p): x.dtype for p, x in jax.tree_util.tree_flatten_with_path(bf16.state.params)[0]}
    in_bf16 = {p for p, d in dtypes.items() if d == jnp.bfloat16}
    # Every frozen kernel and embedding table; biases, norm params, adapters and the head stay fp32.
    matrices = {p for p in dtypes if p.rsplit("/", 1)[-1] in ("kernel", "embedding")}
    assert in_bf16 == {p for p in matrices if p.startswith("backbone/")}
    assert {dtypes[p] for p in ADAPTED | HEAD} == {jnp.dtype(jnp.float32)}
    assert "backbone/layers_0/attention/query/kernel" in in_bf16 and len(in_bf16) == 15
    assert {x.dtype for x in jax.tree.leaves(bf16.state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)} == {
        jnp.dtype(jnp.float32)}
    # The same stage over an fp32 base (what the run held before): the same steps, to bf16 precision
    # with XLA's default excess precision, and bit for bit when XLA rounds to bf16 as written.
    fp32_params, _ = init_params(cfg, trainer.backbone, trainer.tasks, trainer.lora)
    fp32 = build_stage(cfg, trainer.stages[0], trainer.backbone, trainer.tasks, fp32_params, trainer.param_shardings)
    mesh = trainer.backbone.mesh
    batches = [to_global_batch(bf16.train_iter.next_batch(step), mesh) for step in (1, 2, 3)]
    for run in (bf16, fp32):
        run.train_iter.close()
    as_written = {**compiler_options(), "xla_allow_excess_precision": False}
    losses_bf16, trained_bf16 = _steps(bf16, bf16.state, batches, mesh, as_written)
    losses_fp32, trained_fp32 = _steps(fp32, fp32.state, batches, mesh, as_written)
    assert losses_bf16 == losses_fp32
    jax.tree.map(np.testing.assert_array_equal, trained_bf16, trained_fp32)
    losses_bf16, _ = _steps(bf16, bf16.state, batches, mesh, None)
    losses_fp32, _ = _steps(fp32, fp32.state, batches, mesh, None)
    np.testing.assert_allclose(losses_bf16, losses_fp32, rtol=2**-7)


def test_a_frozen_untied_lm_head_is_part_of_the_base(tmp_path):
    """A LoRA decoder whose pretrained LM head does not train (train_head: false; the largest matrix
    of a Llama) holds it in bf16 and leaves it out of checkpoints, like the backbone; export gets
    the model directory's fp32 values back."""
    cfg = load_config("configs/tasks/sft.yaml", [f"run_dir={tmp_path}", *LORA, "trainable.train_head=false",
                                                 "trainable.lora.targets=[q_proj, v_proj]"])
    trainer = Trainer(cfg)
    run = trainer.build(0, trainer.start_params, {})
    run.train_iter.close()
    paths = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(run.state.params)[0]}
    adapters = {p for p in paths if p.endswith(("/lora_a", "/lora_b"))}
    assert len(adapters) == 8 and "head/lm_head/kernel" in paths
    assert run.state.params["head"]["lm_head"]["kernel"].dtype == jnp.bfloat16
    stored = trainer.frozen_base.stored(run.state, 0).params
    assert {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(stored)[0]} == adapters
    exported = trainer.frozen_base.full_precision(to_host(run.state.params))
    np.testing.assert_array_equal(exported["head"]["lm_head"]["kernel"],
                                  trainer.backbone.pretrained_head["lm_head"]["kernel"])
    assert exported["backbone"]["layers_0"]["attn"]["k_proj"]["kernel"].dtype == np.float32


@pytest.mark.slow
def test_lora_checkpoint_holds_the_trained_leaves_only(lora_run, wide_bert, data, tmp_path):
    full = tmp_path / "full"
    train(full, wide_bert, data, 4, "model.dtype=bfloat16")
    lora_bytes, full_bytes = disk_bytes(lora_run / "checkpoints" / "4"), disk_bytes(full / "checkpoints" / "4")
    # Measured: 0.41 MB against 5.05 MB (8%); about 0.1 MB of the LoRA step is orbax's per-leaf metadata.
    assert lora_bytes < 0.25 * full_bytes, (lora_bytes, full_bytes)
    assert saved_arrays(lora_run / "checkpoints" / "4") == {p: "float32" for p in ADAPTED | HEAD}
    assert saved_arrays(full / "checkpoints" / "4")["backbone/layers_0/attention/key/kernel"] == "float32"
    _, backbone, head, _ = load_hf(wide_bert, with_tokenizer=False)
    base = {"backbone": backbone, "head": kept_head("seq_cls", head)}  # the pretrained pooler
    extra = json.loads((lora_run / "checkpoints" / "4" / "extra" / "metadata").read_text())
    assert extra["frozen_base"] == {"model_dir": str(wide_bert), "weights_sha256": weights_fingerprint(base)}
    assert json.loads((full / "checkpoints" / "4" / "extra" / "metadata").read_text())["frozen_base"] is None
    refused = tenure("export", "configs/tasks/seq_cls.yaml", "--checkpoint", full, "--out", tmp_path / "adapter",
                     "--lora-adapter", *quickstart_args(wide_bert, data, "model.dtype=bfloat16"), check=False)
    assert refused.returncode == 2 and not (tmp_path / "adapter").exists()
    assert refused.stderr.strip().splitlines()[-1].endswith(
        "holds no LoRA adapters (trainable.mode is not lora); export without --lora-adapter writes the full model")


@pytest.mark.slow
def test_lora_resume_continues_exactly(lora_run, wide_bert, data, tmp_path):
    train(tmp_path, wide_bert, data, 4, *LORA)
    result = train(tmp_path, wide_bert, data, 8, *LORA)
    assert "resumed from step 4" in result.stdout
    summary = lambda run: json.loads((run / "summary.json").read_text())  # noqa: E731
    assert summary(tmp_path)["train_loss"] == summary(lora_run)["train_loss"]
    assert weights(tmp_path) == weights(lora_run)


@pytest.mark.slow
def test_export_from_a_lora_checkpoint_has_the_pretrained_base(lora_run, wide_bert, data, tmp_path):
    tenure("export", "configs/tasks/seq_cls.yaml", "--checkpoint", lora_run, "--out", tmp_path / "hf",
           *quickstart_args(wide_bert, data, *LORA))
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == weights(lora_run)
    exported, pretrained = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(
        str(wide_bert / "model.safetensors"))
    changed = sorted(k for k in pretrained if not np.array_equal(exported[k], pretrained[k]))
    # The frozen base is the model directory's, bit for bit (fp32, not its bf16 copy); the adapted
    # kernels are merged, the head trained.
    assert changed == sorted([f"bert.encoder.layer.{i}.attention.self.{m}.weight" for i in range(2)
                              for m in ("query", "value")] + ["bert.pooler.dense.bias", "bert.pooler.dense.weight",
                                                              "classifier.bias", "classifier.weight"])


@pytest.mark.slow
def test_changed_model_directory_is_refused(wide_bert, data, tmp_path):
    model, run = tmp_path / "model", tmp_path / "run"
    shutil.copytree(wide_bert, model)
    train(run, model, data, 4, *LORA)
    tensors = load_file(str(model / "model.safetensors"))
    tensors["bert.encoder.layer.0.attention.self.key.weight"] += 1e-3
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    resumed = train(run, model, data, 8, *LORA, check=False)
    evaluated = tenure("eval", "configs/tasks/seq_cls.yaml", "--checkpoint", run, *quickstart_args(model, data, *LORA),
                       check=False)
    for result, where in ((resumed, run / "checkpoints"), (evaluated, run / "checkpoints" / "4")):
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: {model}: the model directory's weights have changed since LoRA checkpoint {where} was saved; "
            "the checkpoint holds only the trained leaves and takes its frozen base from this directory, so "
            "restore the original weights or point model.path at a copy of them")


@pytest.mark.slow
def test_staged_full_then_lora_keeps_the_trained_base_in_its_checkpoints(data, tmp_path):
    config = "configs/continual/split_lexnames.yaml"
    args = [f"model.path={TINY_BERT}", "logging.progress=false", "train.eval_every=2", "checkpoint.every_steps=2",
            "checkpoint.keep=20", "optim.lr=1e-3", "optim.warmup_ratio=0", "optim.schedule=constant", *LORA[1:],
            "stages.0.steps=4", "stages.1.steps=4",
            "stages.0.trainable={mode: lora, include: ['.*'], exclude: ['lora_[ab]$']}",
            "stages.1.trainable={mode: lora}"]
    for name, labels in (("A", ["noun.animal", "noun.plant"]), ("B", ["noun.artifact", "noun.person"])):
        args += [f"tasks.{name}.data.{split}={data[split]}" for split in ("train", "validation", "test")]
        args += [f"tasks.{name}.data.labels={json.dumps(labels)}", f"tasks.{name}.data.batch_size=8"]
    run = tmp_path / "run"
    tenure("train", config, f"run_dir={run}", *args)
    # Stage 2 (steps 5-8) trains adapters only, over the base stage 1 trained: that base is saved, in fp32.
    saved = saved_arrays(run / "checkpoints" / "8")
    assert saved["backbone/layers_0/attention/key/kernel"] == "float32" and ADAPTED <= set(saved)
    tenure("export", config, "--checkpoint", run / "checkpoints" / "8", "--out", tmp_path / "hf", *args)
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == weights(run)
    exported, pretrained = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(
        str(TINY_BERT / "model.safetensors"))
    key = "bert.encoder.layer.0.attention.self.key.weight"
    assert not np.array_equal(exported[key], pretrained[key])  # the restored base is stage 1's, not the pretrained
