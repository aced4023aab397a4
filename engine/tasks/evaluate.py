"""Evaluators: one per task kind, each a jitted reducer plus host-side metrics.

The jitted part turns a batch into small per-example arrays (predictions, labels,
summed token NLL) so only those leave the device; the host part feeds them to the
metric functions in `tenure.engine.tasks.metrics`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from tenure.engine.tasks import metrics
from tenure.engine.data.batch_spec import IGNORE
from tenure.engine.train.step import make_eval_step


def _token_nll(logits_BxLxV, labels_BxL, shift: bool):
    if shift:  # causal LM: position t predicts token t+1
        logits_BxLxV, labels_BxL = logits_BxLxV[:, :-1], labels_BxL[:, 1:]
    valid_BxL = labels_BxL != IGNORE
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    safe_BxL = jnp.where(valid_BxL, labels_BxL, 0)
    nll_BxL = -jnp.take_along_axis(logp_BxLxV, safe_BxL[..., None], axis=-1)[..., 0]
    correct_BxL = jnp.argmax(logp_BxLxV, axis=-1) == safe_BxL
    return ((nll_BxL * valid_BxL).sum(-1), valid_BxL.sum(-1),
            (correct_BxL & valid_BxL).sum(-1))


def reduce_batch(kind: str, outputs: dict, batch: dict) -> dict[str, jax.Array]:
    """Per-example arrays for the host metrics (runs inside jit)."""
    mask_B = batch["example_mask"]
    if kind in ("seq_cls", "pair_cls"):
        logits_BxC = outputs["logits"].astype(jnp.float32)
        nll_B = -jnp.take_along_axis(jax.nn.log_softmax(logits_BxC), batch["labels"][:, None], -1)[:, 0]
        return dict(pred=jnp.argmax(logits_BxC, -1), label=batch["labels"], nll=nll_B, mask=mask_B)
    if kind == "token_cls":
        return dict(pred=jnp.argmax(outputs["logits"], -1), label=batch["labels"], mask=mask_B)
    if kind == "regression":
        return dict(pred=outputs["predictions"].astype(jnp.float32), label=batch["labels"], mask=mask_B)
    if kind in ("mlm", "sft", "causal_lm"):
        nll_B, count_B, correct_B = _token_nll(outputs["logits"], batch["labels"], shift=kind != "mlm")
        return dict(nll=nll_B, count=count_B, correct=correct_B, mask=mask_B)
    if kind == "embedding":
        return dict(query=outputs["query_embeddings"].astype(jnp.float32),
                    passage=outputs["passage_embeddings"][:, 0].astype(jnp.float32), mask=mask_B)
    raise ValueError(f"unknown task kind {kind!r}")


def _to_host(tree: dict) -> dict[str, np.ndarray]:
    # Outputs are replicated, so each process reads its own full copy (works multi-host).
    return {k: np.asarray(v.addressable_data(0)) for k, v in tree.items()}


def _pad_to(array: np.ndarray, length: int) -> np.ndarray:
    if array.ndim < 2 or array.shape[1] == length:
        return array
    return np.pad(array, ((0, 0), (0, length - array.shape[1])), constant_values=IGNORE)


def _concat(parts: list[dict]) -> dict[str, np.ndarray]:
    """Joins batches; token-level arrays from different length buckets pad with IGNORE."""
    merged = {}
    for k in parts[0]:
        length = max(p[k].shape[1] if p[k].ndim > 1 else 0 for p in parts)
        merged[k] = np.concatenate([_pad_to(p[k], length) for p in parts])
    keep = merged.pop("mask") > 0
    return {k: v[keep] for k, v in merged.items()}


def task_metrics(kind: str, got: dict[str, np.ndarray], tag_names: list[str] | None) -> dict[str, float]:
    """Host-side metrics from the concatenated per-example arrays of one split."""
    if kind in ("seq_cls", "pair_cls"):
        scores = metrics.classification_metrics(got["pred"], got["label"])
        scores["loss"] = float(got["nll"].mean())
        return scores
    if kind == "token_cls":
        return metrics.token_labelling_metrics(got["pred"], got["label"], tag_names)
    if kind == "regression":
        return metrics.regression_metrics(got["pred"], got["label"])
    if kind in ("mlm", "sft", "causal_lm"):
        count = float(got["count"].sum())
        return {"perplexity": metrics.perplexity(float(got["nll"].sum()), count),
                "loss": float(got["nll"].sum()) / max(count, 1.0),
                "token_accuracy": float(got["correct"].sum()) / max(count, 1.0)}
    if kind == "embedding":
        scores_QxP = got["query"] @ got["passage"].T  # candidates: every passage in the split
        return metrics.retrieval_metrics(scores_QxP, np.arange(len(scores_QxP)), ks=(1, 5, 10))
    raise ValueError(f"unknown task kind {kind!r}")


@dataclasses.dataclass
class Evaluator:
    """Evaluates one task on one split; `generate` adds BLEU/ROUGE for decoders."""
    kind: str
    reduce_fn: Callable  # jitted (params, batch) -> per-example arrays
    tag_names: list[str] | None = None
    generate: Callable[[Any], dict[str, float]] | None = None

    def __call__(self, params, batches: Iterable[dict]) -> dict[str, float]:
        # Dispatch every batch before reading any back: the host builds the next batch while
        # the device runs the previous ones (outputs are small per-example arrays).
        parts = [_to_host(out) for out in [self.reduce_fn(params, batch) for batch in batches]]
        scores = task_metrics(self.kind, _concat(parts), self.tag_names)
        if self.generate is not None:
            scores.update(self.generate(params))
        return scores


class LMEvalProbe:
    """An lm_eval task: the harness's tasks scored on the given params by the adapter's model
    (`tenure.engine.tasks.lm_eval_adapter.TenureLM`), `limit` documents each; the batches are ignored (the
    harness reads its own documents). Scores are named `<lm-eval task>/<metric>`."""
    generate = None  # no prompting baseline of its own

    def __init__(self, lm, tasks: list[str], limit: int | None) -> None:
        from tenure.engine.tasks.lm_eval_adapter import task_manager_for
        self.lm, self.tasks, self.limit = lm, list(tasks), limit
        self.task_manager = task_manager_for(self.tasks)

    def __call__(self, params, batches: Iterable[dict]) -> dict[str, float]:
        import lm_eval
        from tenure.engine.tasks.lm_eval_adapter import offline_error
        self.lm.params = params  # one harness model per stage model: its jitted forward compiles once
        try:
            out = lm_eval.simple_evaluate(model=self.lm, tasks=self.tasks, limit=self.limit, bootstrap_iters=0,
                                          log_samples=False, task_manager=self.task_manager, verbosity="WARNING")
        except ConnectionError as error:
            raise offline_error(error) from None
        scores = {}
        for task in self.tasks:
            for key, value in out["results"][task].items():
                metric, _, kept = key.partition(",")
                if kept and "_stderr" not in metric:
                    scores[f"{task}/{metric}" + (f",{kept}" if kept != "none" else "")] = float(value)
        return scores


def make_evaluators(tasks, models: dict, mesh, param_shardings, tokenizer) -> dict[str, dict[str, Evaluator]]:
    """task name -> split -> Evaluator, for every split each task's data names; `models` gives each
    task's model (`tenure.engine.train.build.eval_models`). An lm_eval task is scored on `limit` documents for
    test (R) and `eval_limit` for validation (the eval cadence's curves)."""
    evaluators = {}
    reducers = {}
    harness_models = {}
    for name, run_task in tasks.by_name.items():
        spec, data, model = run_task.task.spec, run_task.task.data, models[name]
        if spec.kind == "lm_eval":
            from tenure.engine.tasks.lm_eval_adapter import TenureLM, max_positions
            if id(model) not in harness_models:
                harness_models[id(model)] = TenureLM.of(model, None, tokenizer, max_length=max_positions(model.arch_cfg))
            lm = harness_models[id(model)]
            evaluators[name] = {"test": LMEvalProbe(lm, spec.tasks, spec.limit),
                                "validation": LMEvalProbe(lm, spec.tasks, spec.eval_limit or spec.limit)}
            continue
        if spec.kind not in reducers:  # one model per kind: the stage's, or one probe head
            reducers[spec.kind] = make_eval_step(model, mesh, param_shardings,
                                                 reduce_fn=functools.partial(reduce_batch, spec.kind))
        tags = [str(t) for t in tasks.label_vocab.labels] if spec.kind == "token_cls" else None
        evaluators[name] = {}
        for split in run_task.eval_batches:
            generate = None
            if (spec.kind == "sft" and spec.generation_examples
                    and (data.format or "prompt_completion") == "prompt_completion"):
                from tenure.engine.tasks.generation_eval import GenerationEval
                generate = GenerationEval(spec, data, tokenizer, model, split)
            evaluators[name][split] = Evaluator(spec.kind, reducers[spec.kind], tags, generate)
    return evaluators
