"""`tenure interpolate RUN_DIR`: weight interpolation between a stage's start and its end, no training.

    tenure interpolate runs/x --alphas 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1
    tenure interpolate runs/x --export 0.4 --out runs/x/hf_alpha0.4

theta(a) = (1 - a) theta_start + a theta_end (WiSE-FT, Wortsman et al. 2022; for LLM alignment,
Lin et al. 2024), leaf by leaf in fp32 (cast back to each leaf's dtype). For stage N (`--stage`,
default the last):
  theta_end    the weights R's row for stage N was taken on: the checkpoint at the stage's end
               (a single-task run: its result, the best checkpoint);
  theta_start  `--start stage` (default): the weights stage N started from, i.e. the end of stage
               N-1 (the run's starting model, pretrained with fresh heads, for stage 0);
               `--start run`: the run's starting model for every stage.
Both must still be checkpoints of the run (`checkpoint.keep` keeps the newest few), else the
command says which one is gone. Every task and probe is scored at every alpha with stage N's
evaluators, as R is: the test split (validation without one). So a = 1 reproduces R's row for
stage N exactly, and a = 0 R's row for stage N-1 (or the start row) exactly wherever the heads are
the same in both stages (task-incremental, single-task runs); class-incremental (heads: shared),
stage N's head scores classes stage N-1's did not yet have.

Outputs in RUN_DIR/interpolation/ (or --out-dir): stage<N>.json (alphas, tasks, metric, direction,
rows [{alpha, scores {task: value}}], and the R rows the ends should equal), stage<N>.csv (alpha,
one column per task), stage<N>.png (each other task's score against the stage's own tasks'
score, one point per alpha). `--export ALPHA --out DIR` writes theta(ALPHA) as an HF model
directory (tenure.engine.tools.commands.export_params).

Not supported: LoRA runs (interpolating the factors A, B is not interpolating the merged weight)
and stages that ended under a forgetting guard (their result is no checkpoint): both refused.
"""
from __future__ import annotations

import csv
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from tenure.engine.continual.branch import finished_run_checkpoints, source_checkpoints
from tenure.engine.runtime import atomic, distributed
from tenure.engine.runtime.checkpoint import Checkpointer
from tenure.engine.config.schema import saved_config
from tenure.engine.runtime.distributed import print_primary
from tenure.engine.continual.report import r_summary
from tenure.engine.train.history import RunHistory
from tenure.engine.train.hooks import evaluate_all, task_score
from tenure.engine.train.trainer import Trainer
from tenure.models.errors import TenureError


def parse_alphas(text: str) -> list[float]:
    """'0,0.1,...,1' -> floats in [0, 1]; a bad list is one line."""
    try:
        alphas = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise TenureError(f"--alphas {text!r}: expected comma-separated numbers, e.g. 0,0.5,1") from None
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise TenureError(f"--alphas {text!r}: expected numbers in [0, 1]")
    return alphas


def mix(start, end, alpha: float):
    """(1 - alpha) start + alpha end per leaf, in fp32, in each leaf's dtype."""
    def one(s, e):
        return ((1.0 - alpha) * s.astype(jnp.float32) + alpha * e.astype(jnp.float32)).astype(e.dtype)
    return jax.tree.map(one, start, end)


class Interpolation:
    """A finished run's trainer, checkpoints and history, and the two ends of one stage."""

    def __init__(self, run_dir: str, stage: int | None, start: str):
        self.run_dir = pathlib.Path(run_dir)
        if not self.run_dir.is_dir():
            raise TenureError(f"interpolate: {run_dir}: no such run directory")
        if not (self.run_dir / "summary.json").is_file():
            raise TenureError(f"interpolate: {run_dir} is not a finished run (no summary.json); finish it "
                              "(rerun its `tenure train`) first")
        self.ckpt = Checkpointer(None, finished_run_checkpoints(self.run_dir, "interpolate")[0], read_only=True)
        latest = self.ckpt.latest_step()
        if latest is None:
            raise TenureError(f"interpolate: {self.ckpt.directory}: no checkpoint")
        meta = self.ckpt.read_extra(latest)
        self.history = RunHistory.from_dict(meta["history"])
        done = len(self.history.R)
        if done == 0:  # a run that ends on its best checkpoint takes its row after its last checkpoint
            raise TenureError(f"interpolate: {run_dir}: its checkpoints hold no stage result (R row): it ended on its "
                              "best checkpoint (a single-task run, or one stage with checkpoint.keep_best); "
                              "interpolate a staged run that ends on its last weights")
        self.index = done - 1 if stage is None else stage
        if not 0 <= self.index < done:
            raise TenureError(f"interpolate: --stage {stage}: the run has finished stages 0..{done - 1}")
        cfg = saved_config(meta, f"{self.ckpt.step_dir(latest)} (its config)")
        # a run branched after stage A (`branch_from`) has stage A's end in its source's checkpoints
        # (a source since removed only matters when that checkpoint is needed, and is named then)
        self.sources = [self.ckpt] + ([Checkpointer(None, source_checkpoints(cfg.branch_from)[0], read_only=True)]
                                      if cfg.branch_from and (pathlib.Path(cfg.branch_from) / "summary.json").is_file()
                                      else [])
        self.branch_from = cfg.branch_from
        self.trainer = Trainer(cfg.model_copy(update={"run_dir": str(self.run_dir)}))
        if self.trainer.lora is not None:
            raise TenureError("interpolate: a LoRA run's adapters are factors (A, B); interpolating them is not "
                              "interpolating the merged weight, so LoRA runs are not supported")
        self.end_step = self._end_step(self.index)
        self.start_step = None if (start == "run" or self.index == 0) else self._end_step(self.index - 1)
        self.stage = self.trainer.stages[self.index]

    def _end_step(self, index: int) -> int:
        stage = self.trainer.stages[index]
        if stage.guard is not None:
            raise TenureError(f"interpolate: stage {index} ({stage.name}) ended under a forgetting guard: its "
                              "result is its best weights within budget, which no checkpoint holds")
        step = self.history.stage_ends[index]
        if self._holder(step) is None:
            raise TenureError(f"interpolate: the checkpoint of stage {index}'s end (step {step}) is no longer in "
                              f"{' or '.join(str(c.directory) for c in self.sources)}"
                              + (f" (the run branched from {self.branch_from})" if self.branch_from else "")
                              + " (checkpoint.keep keeps the newest few; rerun with a larger checkpoint.keep, or "
                              "--start run)")
        return step

    def _holder(self, step: int) -> Checkpointer | None:
        return next((ckpt for ckpt in self.sources if step in ckpt.all_steps()), None)

    def _params_at(self, index: int, step: int):
        trainer, ckpt = self.trainer, self._holder(step)
        sr = trainer.build_for_restore(index)
        sr.train_iter.close()
        state, _, _ = trainer.restore(ckpt, sr, sr.state, ckpt.read_extra(step), step)
        return sr, state.params

    def ends(self):
        """(stage run of stage N, theta_start, theta_end)."""
        sr, end = self._params_at(self.index, self.end_step)
        if self.start_step is None:
            start = self.trainer.start_params
        else:
            _, start = self._params_at(self.index - 1, self.start_step)
        return sr, start, end

    def reference_rows(self) -> dict:
        """The R rows a = 0 and a = 1 should reproduce."""
        R, start_row = self.history.R, self.history.start_row
        before = start_row if self.start_step is None else R[self.index - 1]
        return {"alpha_0": before, "alpha_1": R[self.index]}


def curve(interp: Interpolation, sr, start, end, alphas: list[float]) -> list[dict]:
    """Per alpha: `scores` as R takes them (test, else validation), `validation` (None where a task
    has none) and `all` (every split's metrics, as summary.json keys them)."""
    trainer = interp.trainer
    evaluators = trainer.evaluators(sr)
    place = jax.jit(mix, static_argnums=2, out_shardings=sr.state_shardings.params)
    rows = []
    for alpha in alphas:
        params = place(start, end, alpha)
        scores = evaluate_all(trainer.tasks, evaluators, params, ("validation", "test"), trainer.backbone.mesh)
        row = {t: task_score(trainer.tasks, scores, t) for t in trainer.tasks.by_name}
        validation = {t: task_score(trainer.tasks, scores, t, splits=("validation",)) for t in trainer.tasks.by_name}
        rows.append({"alpha": alpha, "scores": row, "validation": validation,
                     "all": {k: float(v) for k, v in scores.items()}})
        print_primary(f"alpha {alpha:g}: " + "  ".join(f"{t} {v:.4f}" for t, v in row.items() if v is not None))
    return rows


def write_as_run(interp: Interpolation, row: dict, run_dir: pathlib.Path) -> None:
    """theta(alpha) of the run's last stage as a finished run in `run_dir`, for `tenure study` to
    tabulate like a trained one (a study's `interpolate:` method): the source's forgetting.json
    with the last R row, summary and end-of-stage validation point at theta(alpha) (the stability
    gap, KL and weight distance, measured along the source's training, left out), its summary.json with `final` at
    theta(alpha), and `interpolated` naming the source and alpha in both."""
    if interp.index != len(interp.trainer.stages) - 1:
        raise TenureError(f"interpolate --as-run: the run as it would end at theta(a) needs the last stage "
                          f"({len(interp.trainer.stages) - 1}), not --stage {interp.index}")
    source = {name: atomic.read_json(interp.run_dir / name, "interpolate a finished run")
              for name in ("forgetting.json", "summary.json")}
    record, summary = source["forgetting.json"], source["summary.json"]
    tasks, index = record["tasks"], interp.index
    R = [*record["R"][:index], [row["scores"][t] for t in tasks]]
    origin = {"from": str(interp.run_dir.resolve()), "stage": index, "alpha": row["alpha"],
              "start": "run start" if interp.start_step is None else f"end of stage {index - 1}"}
    end_point = {"step": interp.end_step, "stage": index, "scores": row["validation"]}
    along_training = ("stability_gap", "kl_to_start", "weight_distance", "summary")
    record = {**{k: v for k, v in record.items() if k not in along_training},
              "R": R, "curves": [*(c for c in record["curves"] if c["stage"] < index), end_point],
              "interpolated": origin}
    if len(R) == len(tasks):
        record["summary"] = r_summary(record)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run_dir / "summary.json", json.dumps({**summary, "final": row["all"], "interpolated": origin},
                                                           indent=2))
    atomic.write_text(run_dir / "forgetting.json", json.dumps(record, indent=2))  # last: the mark of a finished run


def write_curve(out_dir: pathlib.Path, interp: Interpolation, rows: list[dict]) -> dict:
    tasks = interp.trainer.tasks
    names = list(tasks.by_name)
    record = {"run_dir": str(interp.run_dir), "stage": interp.index, "stage_name": interp.stage.name,
              "start": "run start" if interp.start_step is None else f"end of stage {interp.index - 1}",
              "start_step": interp.start_step, "end_step": interp.end_step, "tasks": names,
              "own_tasks": list(interp.stage.weights),
              "metric": {n: t.task.metric for n, t in tasks.by_name.items()},
              "direction": {n: t.task.mode for n, t in tasks.by_name.items()},
              "alphas": [r["alpha"] for r in rows], "rows": rows, "R_rows": interp.reference_rows()}
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"stage{interp.index}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["alpha", *names])
        for r in rows:
            writer.writerow([r["alpha"], *[r["scores"][n] for n in names]])
    plot_curve(record, stem.with_suffix(".png"))
    return record


def plot_curve(record: dict, path: pathlib.Path) -> None:
    """Each other task's (earlier task's or probe's) score against the stage's own tasks' mean
    score, one point per alpha; with no other task, the own score against alpha."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = record["own_tasks"]
    others = [t for t in record["tasks"] if t not in own]
    x = [float(np.mean([r["scores"][t] for t in own])) for r in record["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    if not others:
        ax.plot(record["alphas"], x, marker="o")
        ax.set_xlabel("alpha")
        ax.set_ylabel(f"{'+'.join(own)} ({record['metric'][own[0]]})")
    for task in others:
        y = [r["scores"][task] for r in record["rows"]]
        ax.plot(x, y, marker="o", label=f"{task} ({record['metric'][task]})")
        for xa, ya, alpha in zip(x, y, record["alphas"]):
            if alpha in (0.0, 1.0):
                ax.annotate(f"a={alpha:g}", (xa, ya), fontsize=8, textcoords="offset points", xytext=(4, 4))
    if others:
        ax.set_xlabel(f"{'+'.join(own)} ({record['metric'][own[0]]}), the stage's own")
        ax.set_ylabel("other task / probe")
        ax.legend(loc="best", fontsize=8)
    ax.set_title(f"stage {record['stage']} ({record['stage_name']}): theta(a) from {record['start']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _check_as_run_target(source: pathlib.Path, target: pathlib.Path, force: bool) -> None:
    """Refuses, before anything is evaluated, an --as-run DIR whose results would be replaced: the
    source run itself always, another run's results unless `force` (a study reruns its own)."""
    if target.resolve() == source.resolve():
        raise TenureError(f"interpolate --as-run {target}: that is the source run; its results would be replaced "
                          "by theta(a)'s; give another directory")
    held = [name for name in ("summary.json", "forgetting.json") if (target / name).exists()]
    if held and not force:
        raise TenureError(f"interpolate --as-run {target}: it holds a run's {' and '.join(held)}; give a new "
                          "directory, or --force to replace them")


def interpolate(run_dir: str, alphas: list[float] | None, *, stage: int | None = None, start: str = "stage",
                out_dir: str | None = None, export: float | None = None, export_out: str | None = None,
                force: bool = False, as_run: str | None = None) -> dict | None:
    """The curve of stage `stage` (written and returned) and/or the export of theta(`export`);
    with `as_run`, the one alpha's run (write_as_run) instead of the curve's files."""
    if as_run is not None and (not alphas or len(alphas) != 1):
        raise TenureError("interpolate --as-run DIR: give exactly one alpha (--alphas 0.5)")
    if as_run is not None:
        _check_as_run_target(pathlib.Path(run_dir), pathlib.Path(as_run), force)
    for option, path in (("--out-dir", out_dir), ("--as-run", as_run)):
        if path is not None and pathlib.Path(path).exists() and not pathlib.Path(path).is_dir():
            raise TenureError(f"interpolate {option} {path}: that is a file; give a directory")
    from tenure.engine.tools.commands import export_params
    from tenure.models.hf import check_export_target
    if export is not None:
        if not 0 <= export <= 1:
            raise TenureError(f"--export {export}: expected a number in [0, 1]")
        if export_out is None:
            raise TenureError("--export needs --out DIR (where the HF model directory goes)")
        check_export_target(export_out, force=force)
    distributed.initialize()
    interp = Interpolation(run_dir, stage, start)
    try:
        sr, theta_start, theta_end = interp.ends()
        record = None
        if alphas:
            rows = curve(interp, sr, theta_start, theta_end, alphas)
            if as_run is not None:
                if distributed.is_primary():
                    write_as_run(interp, rows[0], pathlib.Path(as_run))
                    print_primary(f"run at alpha {alphas[0]:g}: {as_run}")
                return None
            target = pathlib.Path(out_dir) if out_dir else interp.run_dir / "interpolation"
            if distributed.is_primary():
                record = write_curve(target, interp, rows)
                print_primary(f"curve: {target / f'stage{interp.index}'}.json (.csv, .png)")
        if export is not None:
            params = jax.jit(mix, static_argnums=2, out_shardings=sr.state_shardings.params)(
                theta_start, theta_end, export)
            export_params(interp.trainer, params, export_out, merge_lora=True, force=force)
            print_primary(f"exported theta({export:g}) of stage {interp.index} to {export_out}")
        return record
    finally:
        interp.ckpt.close(quiet=True)
