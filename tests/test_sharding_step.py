"""Mesh + sharded train step: 1 device vs 8, frozen leaves, head-only FLOPs, accumulation, bf16."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tenure.models.errors import TenureError
from tenure.engine.tasks.kinds import KINDS
from tenure.engine.train.optim import OptimConfig, build_optimizer, build_schedule
from tenure.engine.runtime.sharding import MeshConfig, init_sharded, make_mesh, mesh_shape, param_shardings, put_params
from tenure.engine.train.step import compiled_flops, init_state, make_eval_step, make_train_step
from tenure.engine.train.trainability import TrainableConfig, compile_trainability
from tenure.models.bert import BertConfig
from tenure.models.tasks import build_task_model

TINY = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.1,
                  attention_probs_dropout_prob=0.0)
NUM_LAYERS = TINY.num_hidden_layers


def tiny_model(config=TINY, dtype=jnp.float32, frozen_prefix=0):
    return build_task_model(config, "seq_cls", num_labels=4, pooling="cls", dtype=dtype,
                            frozen_prefix=frozen_prefix)


def make_batch(seed, batch_size=8, length=8):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch_size, length), np.int32)
    mask[::3, length - 3:] = 0
    example_mask = np.ones(batch_size, np.float32)
    example_mask[-1] = 0.0
    return {"input_ids": rng.integers(1, TINY.vocab_size, (batch_size, length), dtype=np.int32),
            "attention_mask": mask, "labels": rng.integers(0, 4, batch_size, dtype=np.int32),
            "example_mask": example_mask}


@functools.cache
def host_params(config=TINY):
    boxed = jax.jit(tiny_model(config).init)(jax.random.PRNGKey(0), make_batch(0))["params"]
    return jax.tree.map(np.asarray, nn.unbox(boxed)), boxed


def run(mesh, params_np, boxed, steps=3, trainable=TrainableConfig(), optim=OptimConfig(lr=1e-2, warmup_steps=1),
        dtype=jnp.float32, accum_steps=1, batches=None, config=TINY):
    """Trains `steps` steps on the mesh; returns (final state, list of metrics)."""
    tr = compile_trainability(params_np, trainable, config.num_hidden_layers)
    model = tiny_model(config, dtype, tr.frozen_prefix)
    shardings = param_shardings(boxed, mesh)
    tx = build_optimizer(optim, tr, total_steps=10)
    state, state_shardings = init_state(put_params(params_np, shardings), tx, 0, mesh, shardings)
    step = make_train_step(model, {"task": KINDS["seq_cls"].loss()}, tx, mesh, state_shardings,
                           lr_schedule=build_schedule(optim, 10), trainable_mask=tr.trainable_mask,
                           accum_steps=accum_steps)
    history = []
    for i in range(steps):
        state, metrics = step(state, batches[i] if batches else make_batch(i + 1))
        history.append(jax.tree.map(np.asarray, metrics))
    return state, history, step, tr


@pytest.fixture(scope="module")
def reference():
    params_np, boxed = host_params()
    state, history, step, _ = run(make_mesh(MeshConfig(data=1), jax.devices()[:1]), params_np, boxed)
    return params_np, boxed, jax.tree.map(np.asarray, state.params), history, step, state


def test_mesh_config_fills_and_rejects():
    assert mesh_shape(MeshConfig(), 8) == (8, 1, 1)
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(TenureError, match=r"mesh\.data=3.*does not divide the 8 devices"):
        mesh_shape(MeshConfig(data=3, fsdp=1, tensor=1), 8)
    with pytest.raises(TenureError, match=r"mesh\.data, mesh\.fsdp"):
        mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_init_sharded_places_params_by_rules():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    params, shardings = init_sharded(lambda: tiny_model().init(jax.random.PRNGKey(0), make_batch(0)), mesh)
    layer = params["params"]["backbone"]["layers_0"]
    assert layer["attention"]["query"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert layer["attention"]["attn_out"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert layer["mlp"]["intermediate"]["bias"].sharding.spec == P("tensor")
    assert layer["attention_norm"]["scale"].sharding.spec == P(None)
    # classes=4 maps to None; embed=16 over fsdp=2
    assert params["params"]["head"]["classifier"]["kernel"].sharding.spec == P("fsdp", None)
    # the shard really is a slice: 16/2 rows, 32/2 cols
    assert layer["mlp"]["intermediate"]["kernel"].addressable_shards[0].data.shape == (8, 16)


def test_init_sharded_makes_only_the_leaves_not_given_and_places_every_leaf():
    """Pretrained runs pass the weights they have: the rest (the fresh head) get the values the
    whole init gives them, the given leaves are kept as given, each in its sharding."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    traces = []

    def init():
        traces.append(1)
        return tiny_model().init(jax.random.PRNGKey(0), make_batch(0))["params"]

    whole, shardings = init_sharded(init, mesh)
    query = np.full((16, 16), 0.5, np.float32)

    def given(shapes):
        assert isinstance(shapes["backbone"]["layers_0"]["attention"]["query"]["kernel"], jax.ShapeDtypeStruct)
        shapes["backbone"]["layers_0"]["attention"]["query"]["kernel"] = jnp.asarray(query)
        return shapes

    traces.clear()
    params, same_shardings = init_sharded(init, mesh, given=given)
    assert len(traces) <= 2  # its shapes (unless cached), one jitted init of the many fresh leaves
    assert same_shardings == shardings
    got = params["backbone"]["layers_0"]["attention"]["query"]["kernel"]
    np.testing.assert_array_equal(np.asarray(got), query)
    assert got.sharding.spec == P("fsdp", "tensor")
    head = params["head"]["classifier"]["kernel"]
    np.testing.assert_array_equal(np.asarray(head), np.asarray(whole["head"]["classifier"]["kernel"]))
    assert head.sharding.spec == P("fsdp", None)
    assert not np.array_equal(np.asarray(whole["backbone"]["layers_0"]["attention"]["query"]["kernel"]), query)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(data=8, fsdp=1), dict(data=1, fsdp=8), dict(data=2, fsdp=2, tensor=2)])
def test_eight_devices_match_one_device(reference, layout):
    params_np, boxed, ref_params, ref_history, _, _ = reference
    state, history, _, _ = run(make_mesh(MeshConfig(**layout)), params_np, boxed)
    for ref, got in zip(ref_history, history):
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
    got_params = jax.tree.map(np.asarray, state.params)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), ref_params, got_params)
    print(layout, "max |param diff| after 3 steps:", max(jax.tree.leaves(diffs)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=2e-6), ref_params, got_params)
    kernel = state.params["backbone"]["layers_0"]["mlp"]["output"]["kernel"]  # axes (mlp, embed)
    want = P("tensor" if layout.get("tensor") else None, "fsdp" if layout["fsdp"] > 1 else None)
    assert kernel.sharding.spec == want
    assert state.params["backbone"]["embeddings"]["word_embeddings"]["embedding"].sharding.spec == \
        P("tensor" if layout.get("tensor") else None, "fsdp" if layout["fsdp"] > 1 else None)
    assert int(history[-1]["step"]) == 3


def test_head_only_freezes_bitwise_and_skips_backward(reference):
    params_np, boxed, _, _, full_step, full_state = reference
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    head_cfg = TrainableConfig(mode="head")
    state, history, head_step, tr = run(mesh, params_np, boxed, steps=3, trainable=head_cfg)
    assert tr.frozen_prefix == NUM_LAYERS + 1
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        before = params_np
        for key in path:
            before = before[key.key]
        if path[0].key == "head":
            assert not np.array_equal(np.asarray(leaf), before), path
        else:
            assert np.array_equal(np.asarray(leaf), before), path
    batch = make_batch(9)
    ratio = compiled_flops(head_step, state, batch) / compiled_flops(full_step, full_state, batch)
    print(f"head-only / full train-step FLOPs: {ratio:.3f}")
    assert ratio < 0.6
    # eval on another layout gives the logits of the trained params on one device
    eval_mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    eval_shardings = param_shardings(boxed, eval_mesh)
    masked_logits = lambda out, b: out["logits"] * b["example_mask"][:, None]
    eval_step = make_eval_step(tiny_model(), eval_mesh, eval_shardings, reduce_fn=masked_logits)
    got = eval_step(put_params(jax.tree.map(np.asarray, state.params), eval_shardings), batch)
    want = masked_logits(jax.jit(tiny_model().apply)({"params": state.params}, batch), batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(got)[-1])  # padding row
    # the grad norm covers the trainable (head) leaves only
    assert 0 < history[0]["grad_norm"] < reference[3][0]["grad_norm"]


@pytest.mark.slow
def test_grad_accumulation_equals_big_batch():
    no_dropout = dataclasses.replace(TINY, hidden_dropout_prob=0.0)
    params_np, boxed = host_params(no_dropout)
    mesh = make_mesh(MeshConfig(data=4, fsdp=1), jax.devices()[:4])
    batch = make_batch(5, batch_size=8)
    batch["example_mask"][:] = 1.0  # equal-weight micro-batches: mean of means == mean
    optim = OptimConfig(name="sgd", lr=0.1, weight_decay=0.0, clip_norm=None, schedule="constant")
    same = dict(optim=optim, steps=1, batches=[batch], config=no_dropout)
    big, big_hist, _, _ = run(mesh, params_np, boxed, **same)
    acc, acc_hist, _, _ = run(mesh, params_np, boxed, accum_steps=2, **same)
    np.testing.assert_allclose(acc_hist[0]["loss"], big_hist[0]["loss"], rtol=1e-5)
    np.testing.assert_allclose(acc_hist[0]["grad_norm"], big_hist[0]["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7),
                 big.params, acc.params)
    assert int(acc_hist[0]["step"]) == 1 and float(acc_hist[0]["tokens"]) == batch["attention_mask"].sum()


@pytest.mark.slow
def test_bf16_compute_close_to_fp32(reference):
    params_np, boxed, _, ref_history, _, _ = reference
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    state, history, _, _ = run(mesh, params_np, boxed, steps=1, dtype=jnp.bfloat16)
    assert state.params["head"]["classifier"]["kernel"].dtype == jnp.float32
    got, want = history[0], ref_history[0]
    print(f"bf16 vs fp32: loss {got['loss']:.7f} / {want['loss']:.7f}, "
          f"grad norm {got['grad_norm']:.5f} / {want['grad_norm']:.5f}")
    assert got["loss"] != want["loss"]  # the compute really ran in bf16
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-3)
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=5e-2)
