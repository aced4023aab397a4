"""Continual-learning summaries of an accuracy matrix.

``R[i, j]`` is the metric (accuracy, F1, ...; higher is better) on task ``j`` after
training stage ``i``; tasks are trained in column order, so ``R`` is ``T x T`` and
``R[j, j]`` is task ``j`` right after its own stage. Indices below are 0-based; the
last stage is ``T-1``. An optional ``start_row`` holds the metric of the starting
model (pretrained, before stage 0) on every task; an optional ``baseline`` vector ``b``
holds the reference each task is compared with for forward transfer (GEM uses a
randomly initialised model; for fine-tuning the starting model is the natural choice,
so ``b`` defaults to ``start_row``).

FWT and its reference (``ForgettingSummary.fwt_against`` says which one a summary used):
  "single-task reference"  given ``reference`` (each task's score when fine-tuned alone from the
      starting model, e.g. a single-task run's), FWT = (1/(T-1)) sum_{j>=1} (R[j, j] - ref[j]):
      what learning the earlier tasks first did to learning task j (Wolczyk et al. 2021's
      forward transfer, as a difference of scores);
  "vs untrained head"  without one, GEM's R[j-1, j] - start_row[j]: a task whose head trains only
      in its own stage is scored by an untrained head on both sides (noise in task-IL; exactly 0
      in class-IL, where its classes are not in the head yet), so it measures the backbone only
      through whatever the untrained head happens to read;
  "baseline"  GEM's form against an explicit ``baseline`` vector.

Lower-is-better metrics (perplexity, loss, mse): `summarize(..., directions=["min", ...])`
negates those columns before computing BWT, FWT and forgetting, so every summary keeps its
sign convention whatever the metric (BWT < 0 and forgetting > 0 mean the task got worse; a
perplexity that rises from 150 to 180 is a forgetting of +30, a BWT of -30), in the metric's
own units. ACC is the plain mean of the last row when every task has the same direction, and
NaN when they differ (a perplexity and a ROUGE score have no meaningful mean).

Undefined quantities (e.g. BWT with a single task) are NaN, never an exception.
"""
from dataclasses import asdict, dataclass

import numpy as np


def _matrix(R) -> np.ndarray:
    matrix = np.asarray(R, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square [stages, tasks], got shape {matrix.shape}")
    return matrix


def _vector(values, num_tasks: int, name: str) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float64)
    if vector.shape != (num_tasks,):
        raise ValueError(f"{name} must have shape ({num_tasks},), got {vector.shape}")
    return vector


def _mean_or_nan(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else float("nan")


def average_accuracy(R) -> float:
    """ACC = (1/T) * sum_j R[T-1, j]: mean over tasks after the last stage (GEM)."""
    matrix = _matrix(R)
    return float(matrix[-1].mean())


def backward_transfer(R) -> float:
    """BWT = (1/(T-1)) * sum_{j<T-1} (R[T-1, j] - R[j, j]) (GEM); negative = forgetting."""
    matrix = _matrix(R)
    last = matrix.shape[0] - 1
    diag = np.diagonal(matrix)[:last]
    return _mean_or_nan(matrix[last, :last] - diag)


def forward_transfer(R, baseline) -> float:
    """FWT = (1/(T-1)) * sum_{j>=1} (R[j-1, j] - b[j]) (GEM).

    How much training on the earlier tasks helps task ``j`` before its own stage,
    relative to the baseline ``b``.
    """
    matrix = _matrix(R)
    num_tasks = matrix.shape[0]
    b = _vector(baseline, num_tasks, "baseline")
    before_own_stage = np.array([matrix[j - 1, j] for j in range(1, num_tasks)])
    return _mean_or_nan(before_own_stage - b[1:])


def forgetting_max_per_task(R) -> np.ndarray:
    """Chaudhry et al. 2018 (RWalk): f_j = max_{l<T-1} R[l, j] - R[T-1, j], for j < T-1.

    The maximum runs over every stage before the last, as in the paper; for the usual
    case where a task peaks at or after its own stage this equals max over l in
    [j, T-2]. The last task has no forgetting yet: NaN.
    """
    matrix = _matrix(R)
    last = matrix.shape[0] - 1
    forgetting = np.full(matrix.shape[1], np.nan)
    if last > 0:
        forgetting[:last] = matrix[:last, :last].max(axis=0) - matrix[last, :last]
    return forgetting


def forgetting_first_per_task(R) -> np.ndarray:
    """Avalanche ``ExperienceForgetting``: f_j = R[j, j] - R[T-1, j], for j < T-1.

    The accuracy right after first training on task ``j`` minus its final accuracy
    (first, not max). Its mean over tasks is -BWT. The last task: NaN.
    """
    matrix = _matrix(R)
    last = matrix.shape[0] - 1
    forgetting = np.full(matrix.shape[1], np.nan)
    forgetting[:last] = np.diagonal(matrix)[:last] - matrix[last, :last]
    return forgetting


@dataclass(frozen=True)
class ForgettingSummary:
    """All summaries of one accuracy matrix; per-task lists have NaN for the last task."""

    acc: float
    bwt: float
    fwt: float
    forgetting_max: float
    forgetting_first: float
    forgetting_max_per_task: list[float]
    forgetting_first_per_task: list[float]
    fwt_against: str = "vs untrained head"

    def as_dict(self) -> dict:
        return asdict(self)


def _signs(directions, num_tasks: int) -> np.ndarray:
    """+1 for a higher-is-better task ("max"), -1 for a lower-is-better one ("min")."""
    if directions is None:
        return np.ones(num_tasks)
    directions = list(directions)
    if len(directions) != num_tasks or any(d not in ("max", "min") for d in directions):
        raise ValueError(f"directions must be {num_tasks} of 'max' / 'min', got {directions}")
    return np.array([1.0 if d == "max" else -1.0 for d in directions])


def forward_transfer_single_task(R, reference) -> float:
    """FWT = (1/(T-1)) * sum_{j>=1} (R[j, j] - ref[j]): each later task learned in the sequence
    against the same task fine-tuned alone (``reference``)."""
    matrix = _matrix(R)
    ref = _vector(reference, matrix.shape[0], "reference")
    return _mean_or_nan(np.diagonal(matrix)[1:] - ref[1:])


def summarize(R, start_row=None, baseline=None, directions=None, reference=None) -> ForgettingSummary:
    """ACC, BWT, FWT and both forgetting measures (per task and averaged over j < T-1).

    FWT uses the single-task ``reference`` if given, else GEM's form against ``baseline`` or,
    without one, ``start_row`` ("vs untrained head"); with none of them it is NaN (module
    docstring). ``directions`` (one "max" / "min" per task, default all "max") flips
    lower-is-better tasks: see the module docstring.
    """
    matrix = _matrix(R)
    num_tasks = matrix.shape[0]
    if start_row is not None:
        start_row = _vector(start_row, num_tasks, "start_row")
    signs = _signs(directions, num_tasks)
    oriented = matrix * signs  # every column higher-is-better
    if reference is not None:
        fwt, against = forward_transfer_single_task(oriented, _vector(reference, num_tasks, "reference") * signs), \
            "single-task reference"
    elif baseline is not None or start_row is not None:
        against = "baseline" if baseline is not None else "vs untrained head"
        fwt = forward_transfer(oriented, _vector(baseline if baseline is not None else start_row, num_tasks,
                                                 "baseline") * signs)
    else:
        fwt, against = float("nan"), "none"
    per_max = forgetting_max_per_task(oriented)
    per_first = forgetting_first_per_task(oriented)
    return ForgettingSummary(
        acc=average_accuracy(matrix) if len(set(signs)) == 1 else float("nan"),
        bwt=backward_transfer(oriented),
        fwt=fwt,
        forgetting_max=_mean_or_nan(per_max[:-1]),
        forgetting_first=_mean_or_nan(per_first[:-1]),
        forgetting_max_per_task=[float(x) for x in per_max],
        forgetting_first_per_task=[float(x) for x in per_first],
        fwt_against=against,
    )


def stability_gap(curves, stage_tasks, directions=None) -> list[dict]:
    """The stability gap (De Lange et al. 2023) from the evaluation curves of a staged run.

    ``curves``: [{step, stage, scores {task: value}}] in step order (a run's forgetting.json);
    ``stage_tasks``: the tasks each stage trains, in stage order; ``directions``: {task: "max" |
    "min"} (default "max"). For every stage s >= 1, over the evaluations taken during it:
      worst_within_stage  {earlier task: its worst score in the stage} (the minimum; the maximum
                          for a lower-is-better task);
      gap_within_stage    {earlier task: its score at the stage's start minus that worst one}, in
                          the oriented sense (> 0: it dipped), the start being the last evaluation
                          before the stage;
      min_acc             mean over the earlier tasks of their worst score since their own stage
                          ended, up to the end of stage s (the paper's min-ACC);
      wc_acc              (1/k) own + (1 - 1/k) min_acc, k = s + 1 and own the mean of the stage's
                          tasks at its last evaluation (the paper's WC-ACC; NaN when the tasks'
                          directions differ).
    Denser evaluations early in a stage (where the gap is) make these sharper; with one
    evaluation per stage end they reduce to R."""
    directions = directions or {}
    sign = lambda t: -1.0 if directions.get(t, "max") == "min" else 1.0  # noqa: E731
    out = []
    for s in range(1, len(stage_tasks)):
        earlier = list(dict.fromkeys(t for tasks in stage_tasks[:s] for t in tasks if t not in stage_tasks[s]))
        during = [c for c in curves if c["stage"] == s]
        before = [c for c in curves if c["stage"] < s]
        if not during or not earlier:
            continue
        worst, gap, since = {}, {}, {}
        for t in earlier:
            values = [sign(t) * c["scores"][t] for c in during if c["scores"].get(t) is not None]
            if not values:
                continue
            worst[t] = sign(t) * min(values)
            start = [sign(t) * c["scores"][t] for c in before if c["scores"].get(t) is not None]
            if start:
                gap[t] = start[-1] - min(values)
            trained_until = max(i for i, tasks in enumerate(stage_tasks[:s]) if t in tasks)
            after_own = [sign(t) * c["scores"][t] for c in curves
                         if trained_until < c["stage"] <= s and c["scores"].get(t) is not None]
            since[t] = min(after_own)
        # min-ACC and WC-ACC in the metric's own units: defined when the tasks share a direction
        signs = {sign(t) for t in [*earlier, *stage_tasks[s]]}
        own = [during[-1]["scores"].get(t) for t in stage_tasks[s]]
        if len(signs) != 1 or not since or any(v is None for v in own):
            min_acc = wc_acc = float("nan")
        else:
            direction = signs.pop()
            oriented_min_acc = float(np.mean(list(since.values())))
            k = s + 1
            oriented_own = float(np.mean([direction * v for v in own]))
            min_acc = direction * oriented_min_acc
            wc_acc = direction * ((1 / k) * oriented_own + (1 - 1 / k) * oriented_min_acc)
        out.append({"stage": s, "worst_within_stage": worst, "gap_within_stage": gap,
                    "min_acc": min_acc, "wc_acc": wc_acc})
    return out
