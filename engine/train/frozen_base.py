"""A LoRA run's frozen base: bfloat16 in the train state, and left out of its checkpoints.

The base is the backbone and the pretrained head leaves a task model keeps (an LM head, BERT's
pooler; `tenure.engine.train.build.kept_head`): what the model directory provides.

bf16 base: with trainable.mode=lora and model.dtype=bfloat16, the base leaves frozen in every
stage of the run are held in bfloat16, except biases and norm params (`scale`). Every layer casts
its kernels and embedding tables to the compute dtype before use, so this halves their memory and
computes what an fp32 base computes when XLA rounds as written (XLA_FLAGS=
--xla_allow_excess_precision=false gives bit-identical steps; by default XLA may skip the rounding
of fp32-held weights, a difference within bf16 precision). GPT-2 adds its token and position
embeddings before casting, so there each table is rounded before the sum instead of after it.
LayerNorm applies its scale and bias in fp32, so norm params stay fp32 (a negligible share of the
bytes). Adapters and every leaf that trains in some stage (usually the task head) stay fp32 master
weights, with fp32 optimizer state.

Out of the checkpoint: in a LoRA run from pretrained weights, a base leaf frozen in every stage
so far still holds the model directory's value (cast as above), so checkpoints leave it out; a
restore takes it from the run's starting params (the model directory again). A leaf that an
earlier stage trained is saved as before. The checkpoint's extras record the SHA-256 of the
pretrained weights, and a restore refuses a model directory whose weights changed since.

Export writes the bf16 frozen matrices at full precision again, from the model directory.
"""
from __future__ import annotations

import functools
import hashlib
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tenure.engine.continual.fisher import overlay, prune
from tenure.engine.train.trainability import FROZEN, compile_trainability, path_str
from tenure.models.errors import TenureError

KEPT_FP32 = ("bias", "scale")  # norm params (LayerNorm applies them in fp32) and biases (few bytes)


def frozen_base_dtype(mode: str, model_dtype: str):
    """The dtype of a run's frozen base matrices: bfloat16 for a bf16 LoRA run, else None (fp32)."""
    return jnp.bfloat16 if mode == "lora" and model_dtype == "bfloat16" else None


def _at(tree: Any, keys: list) -> Any:
    """The node of the nested dict `tree` at `keys`, or None."""
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def frozen_base(labels: Any, pretrained_head: dict | None = None) -> Any:
    """Bool tree like the params: True at the leaves of the base that `labels` (a trainability's)
    freeze. The base is the backbone and the pretrained head leaves the task model keeps
    (`tenure.engine.train.build.kept_head`: an LM head, BERT's pooler)."""
    def frozen(path, label):
        keys = [k.key for k in path]
        return label == FROZEN and (keys[0] == "backbone" or _at({"head": pretrained_head}, keys) is not None)

    return jax.tree_util.tree_map_with_path(frozen, labels)


def cast_frozen_base(params: Any, frozen: Any, dtype) -> Any:
    """`params` with the `frozen` leaves in `dtype`, biases and norm params excepted (no-op for None)."""
    if dtype is None:
        return params

    def cast(path, x, is_frozen):
        if not is_frozen or path_str(path).rsplit("/", 1)[-1] in KEPT_FP32:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):  # abstract params (tenure compile: engine/train/assemble.py)
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params, frozen)


def weights_fingerprint(pretrained: Any) -> str:
    """SHA-256 over the leaves of a tree of pretrained weights (path, dtype, shape and bytes)."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(pretrained)[0], key=lambda p: path_str(p[0])):
        value = np.ascontiguousarray(leaf)
        digest.update(f"{path_str(path)}|{value.dtype}|{value.shape}|".encode())
        digest.update(value.data)
    return digest.hexdigest()


class FrozenBase:
    """What a run does with the frozen leaves of its base: the dtype they are held in, and whether
    its checkpoints leave them out (see the module doc). A run without LoRA leaves all as it was."""

    def __init__(self, cfg, stages: list, backbone, params: Any, pretrained_head: dict | None):
        """`params`: the run's starting params; `pretrained_head`: the head leaves they took from
        the model directory (`tenure.engine.train.build.kept_head`)."""
        lora = stages[0].trainable.mode == "lora"  # the Trainer refuses runs that mix LoRA and non-LoRA stages
        self.dtype = frozen_base_dtype(stages[0].trainable.mode, cfg.model.dtype)
        self.outside = lora and cfg.model.init == "pretrained"
        self.model_dir = backbone.model_dir
        self.pretrained = {"backbone": backbone.pretrained, "head": pretrained_head or {}}
        self.frozen_upto: list[Any] = []  # stage k: True at the base leaves frozen in stages 0..k
        if lora:
            for stage in stages:
                trainability = compile_trainability(params, stage.trainable, num_layers=backbone.arch.num_layers)
                here = frozen_base(trainability.labels, pretrained_head)
                self.frozen_upto.append(jax.tree.map(operator.and_, self.frozen_upto[-1], here)
                                        if self.frozen_upto else here)

    def cast(self, params: Any) -> Any:
        """The run's starting params with the leaves frozen in every stage in the frozen-base dtype."""
        return cast_frozen_base(params, self.frozen_upto[-1], self.dtype) if self.frozen_upto else params

    @functools.cached_property
    def fingerprint(self) -> str:
        return weights_fingerprint(self.pretrained)

    # -- checkpoints ---------------------------------------------------------------------------
    def meta(self) -> dict | None:
        """What a checkpoint's extras record: the model directory its base comes from (None: saved in full)."""
        if not self.outside:
            return None
        return {"model_dir": self.model_dir, "weights_sha256": self.fingerprint}

    def _kept(self, stage: int) -> Any:
        return jax.tree.map(operator.not_, self.frozen_upto[stage])

    def stored(self, state, stage: int):
        """The part of `state` (a train state of stage `stage`) a checkpoint holds."""
        if not self.outside:
            return state
        return state.replace(params=prune(state.params, self._kept(stage)))

    def target(self, abstract_state, meta: dict, where: str):
        """The restore target for a checkpoint with extras `meta`, out of the full `abstract_state`;
        TenureError naming the model directory if the base it needs has changed."""
        saved = meta.get("frozen_base")
        if not saved:
            return abstract_state
        if not self.outside:
            raise TenureError(f"checkpoint {where} holds only the trained leaves of a LoRA run from pretrained "
                              "weights; restore it with that run's config (trainable.mode=lora, model.init=pretrained)")
        if saved.get("weights_sha256") != self.fingerprint:
            recorded = saved.get("model_dir")
            trained = "" if recorded == self.model_dir else f" (it was trained on {recorded})"
            raise TenureError(
                f"{self.model_dir}: the model directory's weights have changed since LoRA checkpoint {where} was "
                f"saved{trained}; the checkpoint holds only the trained leaves and takes its frozen base from "
                "this directory, so restore the original weights or point model.path at a copy of them")
        return abstract_state.replace(params=prune(abstract_state.params, self._kept(int(meta.get("stage", 0)))))

    @staticmethod
    def joined(restored, like_params: Any):
        """A restored (possibly partial) state completed with the leaves of `like_params` it lacks
        (a state of the same stage built from the starting params)."""
        return restored.replace(params=overlay(like_params, restored.params))

    # -- export ---------------------------------------------------------------------------------
    def full_precision(self, host_params: dict) -> dict:
        """Host params with the bf16 frozen matrices back in fp32: the model directory's values (a
        random-init base has no other copy; its bf16 values are then what trained)."""
        if self.dtype is None:
            return host_params

        def restore(path, x, frozen):
            if not frozen or x.dtype == np.float32:
                return x
            value = _at(self.pretrained, [k.key for k in path])
            return np.asarray(x if value is None else value, np.float32)

        return jax.tree_util.tree_map_with_path(restore, host_params, self.frozen_upto[-1])
