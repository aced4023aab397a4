"""`tenure compile`: the real train step compiled ahead of time with abstract params (no weights),
its memory report checked against the executable's own memory analysis and the arrays' shards."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from tenure.engine.tools import aot
from tenure.engine.config.schema import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [f"model.path={ROOT / 'tests/fixtures/bert/seq_cls'}", "data.batch_size=8", "mesh.fsdp=2"]


def _per_chip(tree) -> int:
    return sum(aot._per_chip_bytes(x) for x in jax.tree.leaves(tree))


def test_topology_names():
    assert aot.parse_topology("v5p-8") == ("tpu", "v5p:2x2x1", 4)      # v5p counts TensorCores, 2 per chip
    assert aot.parse_topology("v5p-64") == ("tpu", "v5p:2x4x4", 32)
    assert aot.parse_topology("v6e-16") == ("tpu", "v6e:4x4", 16)      # v6e counts chips
    assert aot.parse_topology("v5litepod-8") == ("tpu", "v5e:2x4", 8)
    assert aot.parse_topology("v5p:2x2x2") == ("tpu", "v5p:2x2x2", 8)
    assert aot.parse_topology("cpu:4") == ("cpu", "", 4)
    with pytest.raises(aot.TenureError, match="expected a slice like v5p-8"):
        aot.parse_topology("tpu-8")


def test_cpu_compile_reports_the_executables_memory():
    cfg = load_config(ROOT / "configs/tasks/seq_cls.yaml", TINY)
    target = aot.target_devices("cpu:4")
    step_fn, state, batch, mesh, _ = aot.build_abstract_step(cfg, target)
    # No weights anywhere: every leaf is abstract.
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves((state, batch)))
    c = aot.compile_for(cfg, "cpu:4")
    analysis = c.compiled.memory_analysis()
    assert c.memory["arguments"] == analysis.argument_size_in_bytes
    assert c.memory["temporaries"] == analysis.temp_size_in_bytes
    # Computed apart from XLA: the shards of state and batch one device holds, byte for byte.
    assert c.memory["arguments"] == _per_chip((state, batch))
    # The donated state comes back in place: only the metrics are new output.
    assert c.memory["aliased"] == _per_chip(state)
    assert c.memory["outputs"] - c.memory["aliased"] < 4096  # a dozen scalars, each aligned
    assert c.memory["total"] == (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                                 - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes
                                 + analysis.generated_code_size_in_bytes)
    assert c.mesh_shape == {"data": 2, "fsdp": 2, "tensor": 1}
    # The largest array: the (160, 32) word embedding, 'embed' dim over fsdp, so 160*32*4/2 bytes a chip.
    path, shape, dtype, spec, nbytes = c.largest[0]
    assert path.endswith("word_embeddings/embedding") and shape == (160, 32) and dtype == "float32"
    assert tuple(spec) == (None, "fsdp") and nbytes == 160 * 32 * 4 // 2
    cost = c.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert c.flops == cost["flops"] > 0
    text, fits = aot.report(c, cfg, 0.4)
    assert fits and "mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in text
    assert f"arguments    {aot._gib(analysis.argument_size_in_bytes)}" in text


TPU_SCRIPT = """
import json, sys
import jax
from tenure.engine.tools import aot
from tenure.engine.config.schema import load_config
cfg = load_config("configs/tasks/seq_cls.yaml", sys.argv[1:])
c = aot.compile_for(cfg, "v5p-8")
a = c.compiled.memory_analysis()
step_fn, state, batch, mesh, _ = aot.build_abstract_step(cfg, c.target)
own = sum(aot._per_chip_bytes(x) for x in jax.tree.leaves((state, batch)))
print("RESULT " + json.dumps({"memory": c.memory, "own": own, "platform": c.target.devices[0].platform,
      "kind": c.target.devices[0].device_kind, "n": len(c.target.devices), "flops": c.flops,
      "analysis": [a.argument_size_in_bytes, a.output_size_in_bytes, a.alias_size_in_bytes,
                   a.temp_size_in_bytes, a.generated_code_size_in_bytes]}))
"""


def _has_libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _has_libtpu(), reason="libtpu not installed (pip install 'tenure[tpu]')")
def test_tpu_compile_for_v5p_8(tmp_path):
    """Through libtpu, in a separate process (libtpu stays out of this one)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", TPU_SCRIPT, *TINY], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert r["platform"] == "tpu" and r["kind"] == "TPU v5" and r["n"] == 4
    args, outs, alias, temp, code = r["analysis"]
    m = r["memory"]
    assert [m["arguments"], m["outputs"], m["aliased"], m["temporaries"], m["code"]] == r["analysis"]
    assert m["total"] == args + outs - alias + temp + code
    # TPU lays small arrays out in (8, 128) tiles, so a chip holds at least the raw shard bytes.
    assert args >= r["own"] and alias >= 0.99 * (args - 8 * 1024)
    assert r["flops"] > 0

    # The CLI: a report that fits, then the same step against a 1 MiB budget: one line, exit 1.
    cmd = [sys.executable, "-m", "tenure.engine.cli", "compile", "configs/tasks/seq_cls.yaml", *TINY, "--topology", "v5p-8"]
    ok = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "on v5p-8 (4 chips, TPU v5p), mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in ok.stdout
    assert "of 95.00 GiB HBM" in ok.stdout and "projected step time" in ok.stdout
    bad = subprocess.run([*cmd, "--hbm-gib", str(1 / 1024)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1
    errors = [l for l in bad.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: does not fit: ")
    assert errors[0].endswith("HBM of TPU v5p on v5p-8; try mesh.fsdp=4 mesh.data=1 (shard params and optimizer "
                              "state over every chip)")


def test_cpu_compile_of_the_ewc_fisher_step():
    cfg = load_config(ROOT / "configs/tasks/seq_cls.yaml", TINY)
    memory, flops = aot.compile_fisher(cfg, "cpu:4")
    # Its arguments: the params' shards and the batch's (no optimizer state), byte for byte, and the
    # int32 budget. The exact Fisher sums over every class under the model's own p(y|x): XLA drops the
    # labels and the rng key as unused arguments.
    target = aot.target_devices("cpu:4")
    _, state, batch, _, _ = aot.build_abstract_step(cfg, target)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    assert memory["arguments"] == _per_chip((state.params, unlabelled)) + 4
    train = aot.compile_for(cfg, "cpu:4")
    # exact Fisher on 8 examples x 2 classes: per-example backward passes cost more than one batched step
    assert flops > 0 and memory["total"] > 0
    assert flops != train.flops
