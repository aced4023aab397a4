"""Steps built separately share an executable exactly when their programs are equal."""
import jax
import jax.numpy as jnp
import numpy as np

from tenure.engine.runtime import executables
from tenure.engine.runtime.executables import SharedStep


def _step(scale: float, name: str = "loss"):
    def step(params, batch):   # a new closure each time, as a new stage or run builds its step
        return {name: jnp.sum(params["w"] * batch) * scale}
    return SharedStep(jax.jit(step), {}, jax.devices()[:1])


def test_equal_programs_share_one_executable_and_different_ones_do_not():
    params, batch = {"w": jnp.arange(4.0)}, np.ones(4, np.float32)
    before = dict(executables.STATS)
    first = _step(0.125)(params, batch)
    again = _step(0.125)(params, batch)          # same program: reused, not compiled
    other = _step(0.25)(params, batch)           # a constant differs: compiled anew
    renamed = _step(0.125, "total")(params, batch)  # same arithmetic, another result tree: compiled anew
    longer = _step(0.125)(params, np.ones(8, np.float32)[:4].copy())  # same shapes: reused
    counts = {k: executables.STATS[k] - before[k] for k in before}
    assert counts == {"compiled": 3, "reused": 2}
    assert float(first["loss"]) == float(again["loss"]) == float(longer["loss"]) == 6 * 0.125
    assert float(other["loss"]) == 6 * 0.25 and float(renamed["total"]) == 6 * 0.125


def test_a_new_shape_lowers_its_own_program_and_lower_is_the_jitted_one():
    step = _step(0.5)
    params = {"w": jnp.arange(3.0)}
    before = executables.STATS["compiled"]
    assert float(step(params, np.ones(3, np.float32))["loss"]) == 1.5
    assert float(step({"w": jnp.arange(5.0)}, np.ones(5, np.float32))["loss"]) == 5.0
    assert float(step(params, np.full(3, 2, np.float32))["loss"]) == 3.0
    assert executables.STATS["compiled"] - before == 2
    assert "stablehlo" in step.lower(params, np.ones(3, np.float32)).as_text()
