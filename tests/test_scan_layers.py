"""model.scan_layers: the layers under one jax.lax.scan compute what the unrolled loop computes
(logits, gradients, sown hidden states, a train step's loss), keep the per-layer param tree,
and still run the frozen prefix forward-only.

The tiny models are the committed fixtures' config.json (tests/fixtures/) with 4 layers and
dropout off, randomly initialised."""
import dataclasses
import json
from functools import cache
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tenure.engine.config.schema import load_config
from tenure.engine.train.build import model_for
from tenure.engine.tasks.kinds import KINDS
from tenure.engine.train.optim import OptimConfig, build_optimizer, build_schedule
from tenure.engine.runtime.sharding import MeshConfig, make_mesh, param_shardings, put_params
from tenure.engine.train.step import init_state, make_train_step
from tenure.engine.train.trainability import TrainableConfig, compile_trainability
from tenure.models.hf import family
from tenure.models.layer_scan import layer_ranges, scan_layers
from tenure.models.lora import LoRASpec
from tenure.models.tasks import build_task_model

FIXTURES = Path(__file__).parent / "fixtures"
NUM_LAYERS = 4
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
              "embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0}
# name -> (fixture directory, config.json changes, task kind)
TINY = {
    "bert": ("bert/seq_cls", {"num_hidden_layers": NUM_LAYERS}, "seq_cls"),
    "gpt2": ("gpt2", {"n_layer": NUM_LAYERS}, "causal_lm"),
    "llama": ("llama", {"num_hidden_layers": NUM_LAYERS}, "causal_lm"),
    # Full then sliding layers: each scanned layer picks its own mask.
    "qwen2_sliding": ("qwen2", {"num_hidden_layers": NUM_LAYERS, "use_sliding_window": True, "sliding_window": 3,
                                "layer_types": ["full_attention"] * 2 + ["sliding_attention"] * 2}, "causal_lm"),
}


@cache
def tiny(name):
    directory, changes, kind = TINY[name]
    d = json.loads((FIXTURES / directory / "config.json").read_text())
    d.update(NO_DROPOUT, **changes)
    return family(d["model_type"]).config_from_hf(d), kind


def make_batch(seed=0, batch_size=2, length=8):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch_size, length), np.int32)
    mask[1, length - 3:] = 0
    return {"input_ids": rng.integers(3, 150, (batch_size, length)).astype(np.int32), "attention_mask": mask}


def model(name, scan, **kw):
    arch, kind = tiny(name)
    return build_task_model(arch, kind, num_labels=3, scan_layers=scan, **kw)


@cache
def init_params(name, lora=None):
    return nn.unbox(model(name, scan=False, lora=lora).init(jax.random.key(0), make_batch())["params"])


def forward_and_grads(mdl, params, batch=None):
    """(logits, loss, d loss / d params) for loss = sum(logits * fixed random weights)."""
    batch = make_batch() if batch is None else batch

    def loss_fn(p):
        logits = mdl.apply({"params": p}, batch)["logits"]
        weights = jax.random.normal(jax.random.key(1), logits.shape)
        return jnp.sum(logits * weights), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return np.asarray(logits), float(loss), jax.tree.map(np.asarray, grads)


def assert_trees_close(ours, ref, rel=1e-5):
    """Leaf by leaf: |ours - ref| <= rel * max(1, max|ref|), and the same tree structure."""
    assert jax.tree.structure(ours) == jax.tree.structure(ref)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ours)[0], jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=0, atol=rel * max(1.0, float(np.max(np.abs(b)))),
                                   err_msg=jax.tree_util.keystr(path))


def scan_count(mdl, params):
    """Scans in the jaxpr of the gradient: one forward per scanned piece, one backward per trainable piece."""
    loss = lambda p: jnp.sum(mdl.apply({"params": p}, make_batch())["logits"])
    return str(jax.make_jaxpr(jax.grad(loss))(params)).count(" scan[")


def test_layer_ranges_split_at_the_frozen_prefix():
    # Stages are [embeddings, layers_0, ...]: frozen_prefix=3 freezes embeddings, layers_0, layers_1.
    assert layer_ranges(4, 0) == [range(0, 4)]
    assert layer_ranges(4, 1) == [range(0, 4)]
    assert layer_ranges(4, 3) == [range(0, 2), range(2, 4)]
    assert layer_ranges(4, 5) == [range(0, 4)]


@pytest.mark.parametrize("name", list(TINY))
def test_scanned_forward_and_grads_equal_unrolled(name):
    params = init_params(name)
    scanned_init = nn.unbox(model(name, scan=True).init(jax.random.key(0), make_batch())["params"])
    assert_trees_close(scanned_init, params, rel=0)  # same tree, same values: init runs unrolled
    assert [k for k in params["backbone"] if k.startswith("layers_")] == [f"layers_{i}" for i in range(NUM_LAYERS)]
    logits, loss, grads = forward_and_grads(model(name, scan=False), params)
    scan_logits, scan_loss, scan_grads = forward_and_grads(model(name, scan=True), params)
    np.testing.assert_allclose(scan_logits, logits, rtol=0, atol=1e-5)
    assert scan_loss == pytest.approx(loss, rel=1e-6)
    assert_trees_close(scan_grads, grads)
    assert all(np.any(g != 0) for g in jax.tree.leaves(scan_grads["backbone"]))


@pytest.mark.parametrize("name, frozen_prefix", [("bert", 3), ("gpt2", 3), ("llama", 3), ("llama", 1),
                                                 ("llama", NUM_LAYERS + 1)])
def test_frozen_prefix_layers_get_zero_gradient(name, frozen_prefix):
    params = init_params(name)
    scanned = model(name, scan=True, frozen_prefix=frozen_prefix)
    logits, _, grads = forward_and_grads(model(name, scan=False, frozen_prefix=frozen_prefix), params)
    scan_logits, _, scan_grads = forward_and_grads(scanned, params)
    np.testing.assert_allclose(scan_logits, logits, rtol=0, atol=1e-5)
    # (GPT-2's embeddings still get the tied LM head's gradient: compared with the unrolled one.)
    frozen_layers = [f"layers_{i}" for i in range(frozen_prefix - 1)]
    for key, subtree in scan_grads["backbone"].items():
        if key in frozen_layers:
            assert all(np.all(g == 0) for g in jax.tree.leaves(subtree)), key
        else:
            assert_trees_close(subtree, grads["backbone"][key])
    # The frozen piece runs forward only: no backward scan for it.
    trainable_pieces = 0 if frozen_prefix > NUM_LAYERS else 1
    assert scan_count(scanned, params) == len(layer_ranges(NUM_LAYERS, frozen_prefix)) + trainable_pieces


def forward_scan_residuals(mdl, params):
    """Elements the gradient's forward scan saves for the backward one (its outputs)."""
    loss = lambda p: jnp.sum(mdl.apply({"params": p}, make_batch())["logits"])
    forward = next(e for e in jax.make_jaxpr(jax.grad(loss))(params).eqns if e.primitive.name == "scan")
    return sum(v.aval.size for v in forward.outvars)


def test_remat_applies_to_the_scanned_body():
    params = init_params("llama")
    _, loss, grads = forward_and_grads(model("llama", scan=False), params)
    saved = {}
    for remat in ("none", "dots", "full"):
        scanned = model("llama", scan=True, remat=remat)
        _, scan_loss, scan_grads = forward_and_grads(scanned, params)
        assert scan_loss == pytest.approx(loss, rel=1e-6)
        assert_trees_close(scan_grads, grads)
        saved[remat] = forward_scan_residuals(scanned, params)
    # "dots" keeps the matmul outputs, "full" only each layer's input.
    assert saved["full"] < saved["dots"] < saved["none"]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_scanned_decoder_sows_every_stage(name):
    params = init_params(name)
    batch = make_batch()
    sown = {}
    for scan in (False, True):
        _, state = model(name, scan).apply({"params": params}, batch, mutable=["intermediates"])
        sown[scan] = [np.asarray(h) for h in state["intermediates"]["backbone"]["hidden_states"]]
    assert len(sown[True]) == len(sown[False]) == NUM_LAYERS + 1
    for ours, ref in zip(sown[True], sown[False]):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_lora_params_are_scanned_too():
    lora = LoRASpec(rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    params = init_params("llama", lora)
    # lora_b starts at 0; make the adapters matter.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 if jax.tree_util.keystr(path).endswith("['lora_b']") else x, params)
    logits, _, grads = forward_and_grads(model("llama", scan=False, lora=lora), params)
    scan_logits, _, scan_grads = forward_and_grads(model("llama", scan=True, lora=lora), params)
    np.testing.assert_allclose(scan_logits, logits, rtol=0, atol=1e-5)
    assert_trees_close(scan_grads, grads)


def test_each_scanned_layer_gets_its_own_dropout_key():
    draw = lambda params, x_D, _, rngs: x_D + jax.random.uniform(rngs["dropout"], x_D.shape)
    _, outputs_NxD = scan_layers(draw, jnp.zeros((3, 1)), jnp.zeros(2), dropout_key=jax.random.key(0),
                                 keep_outputs=True)
    draws_NxD = np.diff(np.asarray(outputs_NxD), axis=0, prepend=0.0)
    assert len({tuple(row) for row in draws_NxD}) == 3 and np.all(draws_NxD > 0)


def test_scanned_dropout_follows_the_key():
    arch, kind = tiny("gpt2")
    arch = dataclasses.replace(arch, resid_dropout=0.5)
    params = init_params("gpt2")
    scanned = build_task_model(arch, kind, scan_layers=True)
    run = lambda key: np.asarray(scanned.apply({"params": params}, make_batch(), deterministic=False,
                                               rngs={"dropout": key})["logits"])
    first, again, other = run(jax.random.key(3)), run(jax.random.key(3)), run(jax.random.key(4))
    np.testing.assert_array_equal(first, again)
    assert np.max(np.abs(first - other)) > 1e-3
    deterministic = np.asarray(scanned.apply({"params": params}, make_batch())["logits"])
    assert np.max(np.abs(first - deterministic)) > 1e-3


def test_config_key_reaches_the_backbone(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {path: minilm}\ntask: {kind: seq_cls}\n"
                    "data: {format: text_label, train: data/wordnet_lexnames/train.jsonl}\n")
    assert load_config(path).model.scan_layers is False
    cfg = load_config(path, ["model.scan_layers=true"])
    arch, _ = tiny("bert")
    task_model = model_for(cfg, arch, cfg.task, 3, None)
    assert task_model.scan_layers is True
    params = init_params("bert")
    logits = lambda mdl: np.asarray(jax.jit(mdl.apply)({"params": params}, make_batch())["logits"])
    np.testing.assert_allclose(logits(task_model), logits(model("bert", scan=False)), rtol=0, atol=1e-5)


def train_losses(scan, mesh, steps=3):
    """Losses of `steps` train steps on one batch (tenure.engine.train.step, last 2 layers + head trainable) and
    the final params."""
    batch = dict(make_batch(batch_size=8), labels=np.arange(8, dtype=np.int32) % 3,
                 example_mask=np.ones(8, np.float32))
    boxed = model("bert", scan=False).init(jax.random.key(0), batch)["params"]
    params_np = jax.tree.map(np.asarray, nn.unbox(boxed))
    trainability = compile_trainability(params_np, TrainableConfig(mode="last_n", last_n=2), NUM_LAYERS)
    assert trainability.frozen_prefix == 3
    mdl = model("bert", scan, frozen_prefix=trainability.frozen_prefix)
    # SGD: Adam would blow up rounding noise in gradients that are exactly 0 in exact arithmetic
    # (attention key biases), making params differ where the computation does not.
    optim = OptimConfig(name="sgd", lr=1e-1, warmup_steps=1)
    tx = build_optimizer(optim, trainability, total_steps=10)
    shardings = param_shardings(boxed, mesh)
    state, state_shardings = init_state(put_params(params_np, shardings), tx, 0, mesh, shardings)
    step = make_train_step(mdl, {"task": KINDS["seq_cls"].loss()}, tx, mesh, state_shardings,
                           lr_schedule=build_schedule(optim, 10), trainable_mask=trainability.trainable_mask)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state.params)


@pytest.mark.parametrize("mesh_config", [MeshConfig(data=1), MeshConfig(data=2, fsdp=2, tensor=2)],
                         ids=["1-device", "data2-fsdp2-tensor2"])
def test_train_step_loss_is_the_same_scanned(mesh_config):
    devices = jax.devices()[:mesh_config.data * mesh_config.fsdp * mesh_config.tensor]
    mesh = make_mesh(mesh_config, devices)
    losses, params = train_losses(False, mesh)
    scan_losses, scan_params = train_losses(True, mesh)
    np.testing.assert_allclose(scan_losses, losses, rtol=1e-5)
    assert_trees_close(scan_params, params)
    start = init_params("bert")["backbone"]
    assert_trees_close(scan_params["backbone"]["layers_1"], start["layers_1"], rel=0)  # frozen
    assert not np.allclose(scan_params["backbone"]["layers_3"]["mlp"]["output"]["kernel"],
                           start["layers_3"]["mlp"]["output"]["kernel"])
