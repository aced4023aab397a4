"""`tenure eval` and `tenure export`: a checkpoint (or an HF directory) back into a model."""
from __future__ import annotations

import json
import pathlib

from tenure.engine.runtime import distributed
from tenure.engine.runtime.checkpoint import Checkpointer
from tenure.engine.config.schema import Config, as_today, to_dict
from tenure.engine.runtime.distributed import print_primary
from tenure.engine.runtime.resume_check import compare_for_eval, eval_drift_message, model_tree
from tenure.engine.train.hooks import evaluate_all
from tenure.engine.train.params import to_host
from tenure.engine.train.trainer import Trainer
from tenure.engine.data.records import LabelVocab
from tenure.models.errors import TenureError
from tenure.models.gguf import export_gguf
from tenure.models.hf import export_hf
from tenure.models.lora import lora_paths
from tenure.engine.tasks.kinds import KINDS


def result_step(ckpt: Checkpointer, ends_on_best: bool) -> int:
    """The checkpoint step of the run's result: the step its summary.json names (a finished run;
    a forgetting guard's pick included) where it is kept, else its best checkpoint for a run that
    ends on it, else its newest. A staged run's best checkpoint is not its result: keep_best ranks
    each stage by its own tasks' score, so it may be a stage-A checkpoint."""
    summary = ckpt.directory.parent / "summary.json"
    try:
        recorded = json.loads(summary.read_text())
        if (summary.parent / recorded["checkpoints"]).resolve() == ckpt.directory.resolve() \
                and recorded["best_step"] in ckpt.all_steps():
            return recorded["best_step"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no finished run's summary beside these checkpoints
    return (ckpt.best_step() if ends_on_best else None) or ckpt.latest_step()


def restore(cfg: Config, path: str):
    """(trainer, stage run, params, step) of `path`: an HF model directory (its weights and task
    head are the model), or a run / checkpoint / step directory (default: the run's result, `result_step`).
    A config whose model-defining keys differ from those the checkpoint was trained with is refused
    (engine/runtime/resume_check.py; the compute dtype and the like may change)."""
    if (pathlib.Path(path) / "config.json").is_file():
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": path})})
        trainer = Trainer(cfg, keep_pretrained_head=True)
        sr = trainer.build(0, trainer.start_params, {}, compute=False)
        return trainer, sr, trainer.start_params, 0
    trainer = Trainer(cfg)
    ckpt, step = Checkpointer.open(path, cfg.checkpoint, **trainer.ranking())
    if ckpt.latest_step() is None:
        raise TenureError(f"{ckpt.directory}: no checkpoint steps in this directory")
    step = step if step is not None else result_step(ckpt, trainer.plan.ends_on_best)
    meta = ckpt.read_extra(step)
    saved = LabelVocab.from_json(meta["labels"]) if meta.get("labels") else None
    if saved != trainer.tasks.label_vocab:  # the classifier rows follow the checkpoint's labels
        raise TenureError(f"{ckpt.directory}: the checkpoint was trained with labels "
                          f"{list(saved.labels) if saved else None}, today's data gives "
                          f"{list(trainer.tasks.label_vocab.labels) if trainer.tasks.label_vocab else None}; "
                          "evaluate or export it with the data it was trained on")
    if meta.get("config"):
        changed = compare_for_eval(model_tree(as_today(meta["config"]), meta.get("stages_computed")),
                                   model_tree(to_dict(cfg), trainer.plan.computed))
        if changed:
            raise TenureError(eval_drift_message(changed, str(ckpt.directory)))
    index = int(meta.get("stage", 0))
    sr = trainer.build_for_restore(index)
    state, _, _ = trainer.restore(ckpt, sr, sr.state, meta, step)
    return trainer, sr, state.params, step


def evaluate_checkpoint(cfg: Config, path: str, split: str) -> dict[str, float]:
    distributed.initialize()
    trainer, sr, params, step = restore(cfg, path)
    if not any(split in t.eval_batches for t in trainer.tasks.by_name.values()):
        raise TenureError(f"config: data.{split} is not set, nothing to evaluate")
    evaluators = trainer.evaluators(sr)
    scores = evaluate_all(trainer.tasks, evaluators, params, (split,), trainer.backbone.mesh)
    sr.train_iter.close()
    print_primary(f"{path} (step {step}):")
    print_primary("\n".join(f"  {k}: {v:.4f}" for k, v in sorted(scores.items())))
    return scores


def export_checkpoint(cfg: Config, path: str, out: str, merge_lora: bool, force: bool = False,
                      fmt: str = "hf", gguf_type: str = "f16") -> None:
    """`fmt` hf: an HF model directory; gguf: one GGUF file of `gguf_type` (f16, bf16, q8_0), for a
    causal LM that started from a GGUF file (its tokenizer metadata is copied from there)."""
    distributed.initialize()
    trainer, sr, params, step = restore(cfg, path)
    sr.train_iter.close()
    if not merge_lora and not lora_paths(params):  # else a full model would be written under the adapter's flag
        raise TenureError(f"export --lora-adapter: {path} (step {step}) holds no LoRA adapters "
                          "(trainable.mode is not lora); export without --lora-adapter writes the full model")
    export_params(trainer, params, out, merge_lora, force, fmt=fmt, gguf_type=gguf_type)
    print_primary(f"exported step {step} of {path} to {out}")


def export_params(trainer: Trainer, params, out: str, merge_lora: bool, force: bool = False, *,
                  fmt: str = "hf", gguf_type: str = "f16") -> None:
    """Writes `params` of the trainer's model at `out` as an HF model directory (`fmt` hf) or a
    GGUF file (every process takes part in gathering them; the primary writes)."""
    host_params = trainer.frozen_base.full_precision(to_host(params))
    tasks = trainer.tasks
    if distributed.is_primary() and fmt == "gguf":
        export_gguf(out, trainer.backbone.arch, host_params, KINDS[tasks.first.task.spec.kind].head,
                    trainer.backbone.model_dir, gguf_type, lora=trainer.lora)
    elif distributed.is_primary():
        labels = [str(label) for label in tasks.label_vocab.labels] if tasks.label_vocab else None
        export_hf(pathlib.Path(out), trainer.backbone.arch, host_params, KINDS[tasks.first.task.spec.kind].head,
                  trainer.backbone.tokenizer, lora=trainer.lora, merge=merge_lora, labels=labels,
                  overwrite=force)
