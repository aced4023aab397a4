"""Evaluators: one per task and split, each the kind's jitted reducer plus its host-side metrics.

The jitted part (`TaskKind.reduce`) turns a batch into small per-example arrays (predictions,
labels, summed token NLL) so only those leave the device; the host part (`TaskKind.scores`) feeds
them to the metric functions in `tenure.engine.tasks.metrics`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import numpy as np

from tenure.engine.tasks.kinds import KINDS, TaskKind
from tenure.engine.data.batch_spec import IGNORE
from tenure.engine.train.step import make_eval_step


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


@dataclasses.dataclass
class Evaluator:
    """Evaluates one task on one split; `generate` adds BLEU/ROUGE for decoders."""
    kind: TaskKind
    reduce_fn: Callable  # jitted (params, batch) -> per-example arrays
    label_names: list[str] | None = None
    generate: Callable[[Any], dict[str, float]] | None = None

    def __call__(self, params, batches: Iterable[dict]) -> dict[str, float]:
        # Dispatch every batch before reading any back: the host builds the next batch while
        # the device runs the previous ones (outputs are small per-example arrays).
        parts = [_to_host(out) for out in [self.reduce_fn(params, batch) for batch in batches]]
        scores = self.kind.scores(_concat(parts), self.label_names)
        if self.generate is not None:
            scores.update(self.generate(params))
        return scores


class LMEvalProbe:
    """An lm_eval task: the harness's tasks scored on the given params by the adapter's model
    (`tenure.engine.tasks.lm_eval_adapter.TenureLM`), `limit` documents each, those after the first
    `after` (the validation documents, held out from the test ones R reads); the batches are ignored
    (the harness reads its own documents). Scores are named `<lm-eval task>/<metric>`."""
    generate = None  # no prompting baseline of its own

    def __init__(self, lm, tasks: list[str], limit: int | None, after: int = 0, key: str = "") -> None:
        from tenure.engine.tasks.lm_eval_adapter import task_manager_for
        self.lm, self.tasks, self.limit, self.after, self.key = lm, list(tasks), limit, after, key
        self.task_manager = task_manager_for(self.tasks)

    def _documents(self, loaded: dict) -> dict:
        """lm-eval's `limit` (R's first documents; None: all), or the indices `after` .. `after + limit` of
        each of its leaf tasks (validation: held out from R's); refuses a task with fewer documents (the
        harness would silently score all it has)."""
        if self.limit is None:
            return {"limit": None}
        from tenure.models.errors import TenureError
        end = self.after + self.limit
        for name, task in loaded["tasks"].items():
            if len(task.eval_docs) < end:
                need = f" after the {self.after} R reads need {end}" if self.after else ""
                raise TenureError(f"config key '{self.key}': {self.limit} documents{need}, and lm-eval task {name} "
                                  f"has {len(task.eval_docs)}")
        if not self.after:
            return {"limit": self.limit}
        return {"samples": {name: list(range(self.after, end)) for name in loaded["tasks"]}}

    def __call__(self, params, batches: Iterable[dict]) -> dict[str, float]:
        import random

        from lm_eval.evaluator import evaluate
        from tenure.engine.tasks.lm_eval_adapter import offline_error
        self.lm.params = params  # one harness model per stage model: its jitted forward compiles once
        # lm-eval's `simple_evaluate` set-up (its default seeds, zero-shot unless the task says, the few-shot
        # seed), then its `evaluate`: simple_evaluate would also run `git describe` in the working
        # directory every call, printing git's "fatal: not a git repository" outside one.
        random.seed(0)
        np.random.seed(1234)
        # lm-eval's bar over each task's documents has no switch: under logging.progress=false its
        # module's tqdm is swapped for a disabled one for the call.
        import lm_eval.api.task as harness_task
        shown = harness_task.tqdm
        if not self.lm.progress:
            harness_task.tqdm = functools.partial(shown, disable=True)
        try:
            loaded = self.task_manager.load(self.tasks)  # fresh task objects: their documents and settings
            for task in loaded["tasks"].values():
                if task.get_config("num_fewshot") is None:
                    task.set_config(key="num_fewshot", value=0)
                task.set_fewshot_seed(seed=1234)
            out = evaluate(lm=self.lm, task_dict=loaded, bootstrap_iters=0, log_samples=False, verbosity="WARNING",
                           **self._documents(loaded))
        except ConnectionError as error:
            raise offline_error(error) from None
        finally:
            harness_task.tqdm = shown
        scores = {}
        for task in self.tasks:
            for key, value in out["results"][task].items():
                metric, _, kept = key.partition(",")
                if kept and "_stderr" not in metric:
                    scores[f"{task}/{metric}" + (f",{kept}" if kept != "none" else "")] = float(value)
        return scores


def make_evaluators(tasks, models: dict, mesh, param_shardings, tokenizer,
                    progress: bool = True) -> dict[str, dict[str, Evaluator]]:
    """task name -> split -> Evaluator, for every split each task's data names; `models` gives each
    task's model (`tenure.engine.train.build.eval_models`). An lm_eval task is scored on its first `limit`
    documents for test (R) and, where it sets `eval_limit`, on that many after them for validation (the
    eval cadence: held out, so a curve or a choice never reads a document R reports)."""
    evaluators = {}
    reducers = {}
    harness_models = {}
    for name, run_task in tasks.by_name.items():
        spec, data, model = run_task.task.spec, run_task.task.data, models[name]
        kind = KINDS[spec.kind]
        if kind.harness:
            from tenure.engine.tasks.lm_eval_adapter import TenureLM, max_positions
            if id(model) not in harness_models:
                harness_models[id(model)] = TenureLM.of(model, None, tokenizer, max_length=max_positions(model.arch_cfg))
                harness_models[id(model)].progress = progress
            lm = harness_models[id(model)]
            evaluators[name] = {"test": LMEvalProbe(lm, spec.tasks, spec.limit, key=f"tasks.{name}.limit")}
            if spec.eval_limit:
                evaluators[name]["validation"] = LMEvalProbe(lm, spec.tasks, spec.eval_limit, after=spec.limit,
                                                             key=f"tasks.{name}.eval_limit")
            continue
        if spec.kind not in reducers:  # one model per kind: the stage's, or one probe head
            reducers[spec.kind] = make_eval_step(model, mesh, param_shardings,
                                                 reduce_fn=kind.reduce)
        labels = [str(t) for t in tasks.label_vocab.labels] if kind.labelled else None
        evaluators[name] = {}
        for split in run_task.eval_batches:
            generate = None
            if (kind.generation and spec.generation_examples
                    and (data.format or "prompt_completion") == "prompt_completion"):
                from tenure.engine.tasks.generation_eval import GenerationEval
                generate = GenerationEval(spec, data, tokenizer, model, split)
            evaluators[name][split] = Evaluator(kind, reducers[spec.kind], labels, generate)
    return evaluators
