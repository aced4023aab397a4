"""The training loop: baseline eval, jitted steps, periodic eval, early stopping,
checkpoints, TensorBoard, and the final before/after table with an HF export."""
from __future__ import annotations

import json
import pathlib
import time

import jax
from jax.experimental import multihost_utils
import numpy as np
import yaml

from engine import distributed
from engine.build import MODEL_KIND, Run, build_run
from engine.checkpoint import Checkpointer
from engine.config import Config, to_dict
from engine.data.pipeline import to_global_batch
from models.errors import TenureError
from engine.evaluate import Evaluator, make_evaluators
from engine.optim import build_schedule
from engine.monitor import BestTracker, OverfitMonitor
from engine.progress import Progress
from engine.step import make_train_step
from engine.tblog import TBLogger
from models.hf import export_hf


def _abstract(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


def _evaluate_all(run: Run, evaluators: dict[str, Evaluator], params, splits) -> dict[str, float]:
    scores = {}
    for split in splits:
        if split in evaluators:
            batches = (to_global_batch(b, run.mesh) for b in run.eval_batches[split])
            for name, value in evaluators[split](params, batches).items():
                scores[f"{split}/{name}"] = value
    return scores


def _to_host(params):
    """Full numpy copies of (possibly cross-host sharded) params on every process."""
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))


def _export_kind(cfg: Config) -> str:
    return MODEL_KIND.get(cfg.task.kind, cfg.task.kind)


def _label_names(run: Run) -> list[str] | None:
    return [str(label) for label in run.label_vocab.labels] if run.label_vocab else None


def _print(msg: str) -> None:
    if distributed.is_primary():
        print(msg, flush=True)


def _table(metric_names, columns: dict[str, dict[str, float]]) -> str:
    heads = list(columns)
    width = max(len(n) for n in metric_names) + 2
    lines = ["".ljust(width) + "".join(h.rjust(26) for h in heads)]
    for name in metric_names:
        cells = "".join(
            (f"{columns[h][name]:.4f}" if name in columns[h] else "-").rjust(26) for h in heads)
        lines.append(name.ljust(width) + cells)
    return "\n".join(lines)


def train(cfg: Config) -> dict:
    """Runs the config's fine-tune; returns the summary it also prints and writes."""
    distributed.initialize()
    run_dir = pathlib.Path(cfg.run_dir)
    run = build_run(cfg)
    _print(f"model {run.model_dir}  task {cfg.task.kind}  mesh {dict(run.mesh.shape)}  "
           f"steps {run.total_steps}\n{run.trainability.summary()}")
    step_fn = make_train_step(run.model, run.losses, run.tx, run.mesh, run.state_shardings,
                              lr_schedule=build_schedule(cfg.optim, run.total_steps),
                              trainable_mask=run.trainability.trainable_mask,
                              accum_steps=cfg.optim.grad_accum_steps)
    evaluators = make_evaluators(run)
    ckpt = Checkpointer(cfg.checkpoint, cfg.checkpoint.resolved_dir(run_dir), **_ranking(cfg))
    tb = TBLogger(run_dir / "tb", enabled=distributed.is_primary() and cfg.logging.tensorboard)
    tb.text(0, "config", "```\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False) + "\n```")

    state, start, history = run.state, 0, {}
    if cfg.train.resume and ckpt.latest_step() is not None:
        state, data_state, extra = ckpt.restore_latest_good(_abstract(run.state, run.state_shardings))
        run.train_iter.set_state(data_state)
        start, history = int(extra["step"]), extra["history"]
        _print(f"resumed from step {start} ({ckpt.directory})")
    else:
        history["baseline"] = _evaluate_all(run, evaluators, state.params, ("validation", "test"))
        for split, evaluator in evaluators.items():  # decoders: the prompting baseline
            if evaluator.generate is not None and cfg.task.few_shot:
                few = evaluator.generate(state.params, with_examples=True)
                history["baseline"].update(
                    {f"{split}/{cfg.task.few_shot}shot_{k}": v for k, v in few.items()})
        tb.scalars(0, {f"baseline/{k}": v for k, v in history["baseline"].items()})
        _print("baseline (pretrained model, fresh head): " + json.dumps(
            {k: round(v, 4) for k, v in history["baseline"].items()}))

    best = BestTracker(cfg.eval.metric, cfg.eval.mode, cfg.train.early_stopping, history)
    overfit = OverfitMonitor()
    progress = Progress(run.total_steps, desc="train", initial=start,
                        enabled=distributed.is_primary() and cfg.logging.progress)
    pending, train_losses = None, []
    step = start
    for step in range(start + 1, run.total_steps + 1):
        local = next(run.train_iter)
        state, metrics = step_fn(state, to_global_batch(local, run.mesh))
        if pending is not None:  # read the previous step's metrics while this one runs
            _log_step(*pending, tb, progress, train_losses, cfg.train.log_every, history)
        pending = (step, metrics)
        if step % cfg.train.eval_every == 0 or step == run.total_steps:
            _log_step(*pending, tb, progress, train_losses, cfg.train.log_every, history)
            pending = None
            scores = _evaluate_all(run, evaluators, state.params, ("validation",))
            tb.scalars(step, scores)
            improved, stop = best.update(step, scores)
            _print(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(scores.items()))
                   + ("  (best so far)" if improved else ""))
            warning = overfit.update(float(np.mean(train_losses)), scores, improved)
            train_losses.clear()
            if warning:
                _print(f"warning: step {step}: {warning}")
            history.setdefault("evals", []).append({"step": step, **scores})
            _save(ckpt, run, step, state, history, metrics=scores)
            if stop:
                _print(f"early stopping at step {step}: no improvement in "
                       f"validation/{cfg.eval.metric} for {cfg.train.early_stopping.patience} evals")
                break
        elif step % cfg.checkpoint.every_steps == 0:
            _log_step(*pending, tb, progress, train_losses, cfg.train.log_every, history)
            pending = None
            _save(ckpt, run, step, state, history)
    if pending is not None:
        _log_step(*pending, tb, progress, train_losses, cfg.train.log_every, history)
    progress.close()
    ckpt.wait()

    final_params, final_step = state.params, step
    if ckpt.best_step() is not None and ckpt.best_step() != step:
        best_state, _, _ = ckpt.restore(ckpt.best_step(), _abstract(state, run.state_shardings))
        final_params, final_step = best_state.params, ckpt.best_step()
    history["final"] = _evaluate_all(run, evaluators, final_params, ("validation", "test"))
    tb.scalars(final_step, {f"final/{k}": v for k, v in history["final"].items()})
    export_dir = run_dir / "hf"
    host_params = _to_host(final_params)  # collective: every process takes part
    if distributed.is_primary():
        export_hf(export_dir, run.arch, host_params, _export_kind(cfg), run.tokenizer,
                  lora=run.model.lora, merge=True, labels=_label_names(run))
    tb.close()
    summary = {"baseline": history.get("baseline", {}), "final": history["final"],
               "train_loss": history.get("train_loss", []),
               "best_step": final_step, "run_dir": str(run_dir),
               "tensorboard": str(run_dir / "tb"), "checkpoints": str(ckpt.directory),
               "hf_export": str(export_dir)}
    if distributed.is_primary():
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        names = sorted(k for k in history["final"] if k.startswith("test/"))
        _print("\n" + _table(names, {"pretrained + fresh head": summary["baseline"],
                                     f"fine-tuned (step {final_step})": summary["final"]}))
        _print(f"\nTensorBoard: tensorboard --logdir {summary['tensorboard']}\n"
               f"checkpoints: {summary['checkpoints']}\nHF export:   {export_dir}")
    return summary


def _save(ckpt: Checkpointer, run: Run, step: int, state, history: dict, metrics=None) -> None:
    """State, data-iterator position, and what resuming needs to carry on the same run."""
    ckpt.save(step, state, run.train_iter.get_state(), force=True, metrics=metrics,
              extra={"step": step, "history": history, "config": to_dict(run.cfg),
                     "labels": run.label_vocab.to_json() if run.label_vocab else None})


def _log_step(step, metrics, tb, progress, train_losses, log_every, history):
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    tokens = int(values.pop("tokens"))
    if not np.isfinite(values["loss"]):
        raise TenureError(f"step {step}: training loss is {values['loss']}; lower optim.lr "
                          "or check the data (the last good checkpoint is kept)")
    train_losses.append(values["loss"])
    history.setdefault("train_loss", []).append(values["loss"])
    progress.update(step, values["loss"], tokens)
    if step % log_every == 0:
        tb.scalars(step, {f"train/{k}": v for k, v in values.items()}
                   | {"train/tokens_per_second": progress.tokens_per_second})


def _ranking(cfg: Config) -> dict:
    return dict(best_metric=f"validation/{cfg.eval.metric}", best_mode=cfg.eval.mode)


def _restored_run(cfg: Config, path: str) -> tuple[Run, dict, int]:
    if (pathlib.Path(path) / "config.json").is_file():  # an HF directory: weights are the model
        run = build_run(cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": path})}),
                        whole_pretrained_head=True)
        return run, run.state.params, 0
    ckpt, step = Checkpointer.open(path, cfg.checkpoint, **_ranking(cfg))
    if ckpt.latest_step() is None:
        raise TenureError(f"{ckpt.directory}: no checkpoint steps in this directory")
    step = step if step is not None else (ckpt.best_step() or ckpt.latest_step())
    run = build_run(cfg)
    state, _, _ = ckpt.restore(step, _abstract(run.state, run.state_shardings))
    return run, state.params, step


def evaluate_checkpoint(cfg: Config, path: str, split: str) -> dict[str, float]:
    distributed.initialize()
    run, params, step = _restored_run(cfg, path)
    if split not in run.eval_batches:
        raise TenureError(f"config: data.{split} is not set, nothing to evaluate")
    scores = _evaluate_all(run, make_evaluators(run), params, (split,))
    _print(f"{path} (step {step}):")
    _print("\n".join(f"  {k}: {v:.4f}" for k, v in sorted(scores.items())))
    return scores


def export_checkpoint(cfg: Config, path: str, out: str, merge_lora: bool) -> None:
    distributed.initialize()
    run, params, step = _restored_run(cfg, path)
    host_params = _to_host(params)
    if distributed.is_primary():
        export_hf(pathlib.Path(out), run.arch, host_params, _export_kind(cfg), run.tokenizer,
                  lora=run.model.lora, merge=merge_lora,
                  labels=_label_names(run))
    _print(f"exported step {step} of {path} to {out}")
