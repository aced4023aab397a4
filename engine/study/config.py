"""The study file: a base staged run, named methods (override sets), an optional grid, seeds.

```yaml
base: ../tasks/lexnames_split.yaml      # relative to this file
seeds: 5                                # train.seed = 0 .. 4 (default 5)
methods:                                # name -> key=value overrides of the base ([] = as is)
  naive: []
  ewc: []
  replay: [stages.1.replay.ratio=0.2]
sweep:                                  # optional: a method's own axes; every combination is a point
  ewc: {stages.1.ewc.lambda: [1.0e2, 1.0e4, 1.0e6]}   # runs ewc[stages.1.ewc.lambda=100] etc.
  lora: {"trainable.lora.rank,trainable.lora.alpha": [[4, 8], [16, 32]]}   # keys that move together
interpolate:                            # optional: methods that train nothing: the last stage of a trained
  wise: {of: naive, alphas: [0.25, 0.5, 0.75]}   # method's runs at theta(a) (`tenure interpolate --as-run`)
reference: naive                        # optional: paired differences are to this method (default naive)
select: acc                             # optional: the best point of each swept method, on VALIDATION
tradeoff: {learning: learning_newest, forgetting: forgetting_max, levels: [0.8, 0.9]}
grid:                                   # optional: every combination is a cell
  data.subset: [100, 1000]
  data.label_noise: [0.0, 0.2]
exclude:                                # optional: cells not to run, each matched by some axes
  - {data.subset: 1000, data.label_noise: 0.2}
seed_keys: [data.seed]                  # optional: keys that take the seed too (a new data draw)
grid_plot: {x: data.subset, y: [acc]}   # optional: figures against a numeric grid axis
```

`plan_runs` expands it into one `Run` per (cell, method, sweep point, seed): its run dir under
the study's out dir and the exact `tenure train` command; an `interpolate:` method adds one per
(cell, alpha, seed), its point `alpha=a`, whose command interpolates the same cell and seed's run
of `of` (at the sweep point `at` names when `of` sweeps) and runs after every trained run. Overrides apply in the order base,
method, sweep point, grid cell, then `run_dir`, `train.seed` and the `seed_keys` (later wins),
so a grid axis sweeps a key even when a method sets it (a sweep key may not also be set by its
method or be a grid axis: it would be set twice). A sweep value written `1e3` (text to YAML 1.1)
is read as the number 1000.

A run with one stage and one task (a plain fine-tune, `tenure train` without `stages:`) is
tabulated by its single-task figures (SINGLE: test and validation score, train/validation
loss gap, early stopping and the overfitting monitor, from its summary.json); a staged run
by its forgetting figures (STATS, from its forgetting.json).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import re
import sys
from typing import Any

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tenure.engine.config import yamlfile
from tenure.engine.config.schema import one_line, read_yaml_mapping
from tenure.models.errors import TenureError

STATS = {  # name -> column title, in table order (after the per-task final scores)
    "acc": "ACC",
    "bwt": "BWT",
    "fwt": "FWT",
    "forgetting_max": "forgetting (max)",
    "forgetting_first": "forgetting (first)",
    "learning_newest": "learning (newest task)",
    "learning_diag": "learning (mean of diagonal)",
}
SINGLE = {  # single-task runs: name -> column title ({metric}: the task's metric), in table order
    "test": "test {metric}",
    "validation": "validation {metric}",
    "gap_best": "loss gap at best step",
    "gap_last": "loss gap at last eval",
    "best_step": "best step",
    "early_stop": "early stop fired",
    "early_stop_step": "early stop step",
    "overfit": "overfit warning fired",
    "overfit_step": "first overfit warning",
}
COUNTS = ("early_stop", "overfit")  # 0/1 per seed, shown as seeds that fired / seeds
RESERVED_KEYS = ("run_dir", "train.seed")  # set by the study tool for every run
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _check_override(text: Any) -> str:
    if not isinstance(text, str):
        raise ValueError(f"expected a 'key=value' string, got {text!r}")
    key, sep, _ = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"expected 'key.sub=value', got {text!r}")
    if key in RESERVED_KEYS:
        raise ValueError(f"'{key}' is set by the study tool for every run")
    return text


def _check_axis(key: str, values: list[Any]) -> None:
    """A grid or sweep axis: a dotted config key the tool does not set, with distinct values."""
    _check_override(f"{key}=")
    if not values:
        raise ValueError(f"axis '{key}' has no values")
    if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
        raise ValueError(f"axis '{key}' repeats a value")


def axis_keys(axis: str) -> list[str]:
    """The config keys of a sweep axis: 'a,b' moves a and b together (each value a list [a, b])."""
    return axis.split(",")


def axis_pairs(axis: str, value: Any) -> tuple[tuple[str, Any], ...]:
    """(key, value) of each config key an axis value sets."""
    keys = axis_keys(axis)
    return ((axis, value),) if len(keys) == 1 else tuple(zip(keys, value))


def _check_sweep_axis(axis: str, values: list[Any]) -> list[Any]:
    """A sweep axis, its `1e3` texts read as numbers; a tied axis's values are lists, one
    entry per key."""
    keys = axis_keys(axis)
    if len(keys) == 1:
        values = [_number_text(v) for v in values]
    else:
        if len(set(keys)) != len(keys):
            raise ValueError(f"axis '{axis}' names a key twice")
        for key in keys:
            _check_override(f"{key}=")
        if any(not isinstance(v, list) or len(v) != len(keys) for v in values):
            raise ValueError(f"axis '{axis}' moves {len(keys)} keys together: each value must be a list of "
                             f"{len(keys)} (one per key), got {values!r}")
        values = [[_number_text(x) for x in v] for v in values]
    _check_axis(axis, values)
    return values


FIGURE_PREFIXES = ("final/", "change/", "drop/")  # per-task figures: final/<task>, change/<task>, drop/<task>


def _check_figure(value: str) -> str:
    if value not in STATS and not value.startswith(FIGURE_PREFIXES):
        raise ValueError(f"expected one of {', '.join(STATS)}, final/<task>, change/<task> or drop/<task>, "
                         f"got {value!r}")
    return value


class Tradeoff(BaseModel):
    """What a study calls learning and forgetting (each a figure of one run: a STATS name or a
    per-task column), and the fixed learning levels at which methods are compared besides the
    reference's own."""

    model_config = ConfigDict(extra="forbid")

    learning: str = Field("learning_newest", description="learning: a STATS name or final/<task> (the last "
                                                         "task's test score after its stage by default)")
    forgetting: str = Field("forgetting_max", description="forgetting: a STATS name or drop/<task> (an "
                                                          "evaluation-only task's drop from the start)")
    levels: list[float] = Field(default_factory=list, description="learning levels (besides the reference "
                                                                  "method's) at which forgetting is interpolated")

    @field_validator("learning", "forgetting")
    @classmethod
    def _known(cls, value: str):
        return _check_figure(value)


def _number_text(value: Any) -> Any:
    """`1e3` is text to YAML 1.1 (PyYAML); in a sweep it means the number."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        return float(value)
    return value


class GridPlot(BaseModel):
    """The figure of a grid study: each `y` (a table column) against the numeric grid axis `x`,
    one line per combination of the other axes (and method)."""

    model_config = ConfigDict(extra="forbid")

    x: str = Field(description="a grid axis with numeric values (e.g. data.subset)")
    y: list[str] = Field(min_length=1, description="table columns to plot: a SINGLE or STATS name, or final/<task>")

    @field_validator("y")
    @classmethod
    def _known(cls, values: list[str]):
        for value in values:
            if value not in SINGLE and value not in STATS and not value.startswith(FIGURE_PREFIXES):
                raise ValueError(f"expected one of {', '.join([*SINGLE, *STATS])}, final/<task>, change/<task> or "
                                 f"drop/<task>, got {value!r}")
        return values


class Interpolated(BaseModel):
    """A method that trains nothing: theta(a) = (1-a) theta_start + a theta_end of the last stage
    of another method's runs (WiSE-FT), each alpha a point of its curve."""

    model_config = ConfigDict(extra="forbid")

    of: str = Field(description="the trained method whose runs (one per cell and seed) are interpolated")
    at: dict[str, Any] = Field(default_factory=dict, description="the point of `of`'s sweep to interpolate: a "
                                                                 "value for each of its sweep keys")
    alphas: list[float] = Field(min_length=1, description="a in [0, 1]; 1 is `of`'s run itself, 0 the stage's start")

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, alphas: list[float]):
        if any(not 0 <= a <= 1 for a in alphas) or len(set(alphas)) != len(alphas):
            raise ValueError(f"expected distinct numbers in [0, 1], got {alphas}")
        return alphas

    @field_validator("at")
    @classmethod
    def _at(cls, at: dict[str, Any]):
        return {key: [_number_text(x) for x in value] if isinstance(value, list) else _number_text(value)
                for key, value in at.items()}


class StudyConfig(BaseModel):
    """One study: the same staged run per method, grid cell and seed."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="the run config every run starts from (path relative to the study file)")
    methods: dict[str, list[str]] = Field(
        min_length=1, description="method name -> list of 'key=value' overrides of the base ([] = the base as is)")
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="other axes: config key -> values; every combination is a cell, "
                                          "run for every method and seed")
    sweep: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict, description="method name -> its own axes (config key -> values; 'k1,k2' -> lists "
                                          "[v1, v2] moves keys together); every combination is a point of that "
                                          "method, run in every cell and seed")
    interpolate: dict[str, Interpolated] = Field(
        default_factory=dict, description="method name -> {of, at, alphas}: another method's runs at theta(a), "
                                          "scored without training (run after the trained ones)")
    reference: str | None = Field(None, description="the method every other is compared with, paired by seed; "
                                                    "null = naive when the study has it (else no comparison)")
    select: str | None = Field(None, description="figure (STATS name or final/<task>) by whose VALIDATION mean "
                                                 "the best point of each swept method is chosen; null = none")
    # bounded: `seeds: 1000000000` would plan a run per seed until memory ran out
    seeds: int = Field(5, ge=1, le=1000, description="seeds per method and cell: train.seed = 0 .. seeds-1")
    keep_checkpoints: bool = Field(True, description="false: a run writes no checkpoints (a killed one starts "
                                                     "over) and its HF export is deleted once it has finished (the "
                                                     "tables read only its JSON), except a first stage others branch "
                                                     "from or a run an interpolation reads (and a run that ends on its "
                                                     "best checkpoint, whose checkpoints are deleted afterwards)")
    out: str | None = Field(None, description="directory for the runs, tables and plots (relative to the "
                                              "working directory); null = runs/study/<study file name>")
    exclude: list[dict[str, Any]] = Field(
        default_factory=list, description="grid cells not to run: each entry maps some grid axes to a value; "
                                          "a cell that matches every pair of an entry is left out")
    seed_keys: list[str] = Field(
        default_factory=list, description="config keys set to the seed as well as train.seed, e.g. data.seed "
                                          "(each seed draws its own training subset and label noise)")
    tradeoff: Tradeoff = Field(default_factory=Tradeoff, description="learning and forgetting: the axes of the "
                                                                     "trade-off plot and of matched learning")
    grid_plot: GridPlot | None = Field(
        None, description="figure against a numeric grid axis; null = the first numeric axis, with test score and "
                          "loss gap (single-task) or ACC and forgetting (staged)")

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods: dict[str, list[str]]):
        for name, overrides in methods.items():
            if not _NAME.match(name):
                raise ValueError(f"method name {name!r}: use letters, digits and _ . + - (it names a directory)")
            for text in overrides:
                try:
                    _check_override(text)
                except ValueError as exc:
                    raise ValueError(f"method '{name}': {exc}") from None
        return methods

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: dict[str, list[Any]]):
        for key, values in grid.items():
            _check_axis(key, values)
        return grid

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, sweep: dict[str, dict[str, list[Any]]]):
        for method, axes in sweep.items():
            if not axes:
                raise ValueError(f"method '{method}' has no axis")
            for key, values in axes.items():
                try:
                    values[:] = _check_sweep_axis(key, values)
                except ValueError as exc:
                    raise ValueError(f"method '{method}': {exc}") from None
        return sweep

    @field_validator("select")
    @classmethod
    def _select(cls, value: str | None):
        return None if value is None else _check_figure(value)

    @field_validator("seed_keys")
    @classmethod
    def _seed_keys(cls, keys: list[str]):
        for key in keys:
            _check_override(f"{key}=")
        if len(set(keys)) != len(keys):
            raise ValueError("a key is listed twice")
        return keys

    @pydantic.model_validator(mode="after")
    def _consistent(self):
        for method, axes in self.sweep.items():
            if method not in self.methods:
                raise ValueError(f"'sweep.{method}': not a method of the study")
            for key in (k for axis in axes for k in axis_keys(axis)):
                if any(o.partition("=")[0] == key for o in self.methods[method]):
                    raise ValueError(f"'sweep.{method}': '{key}' is also set by the method's overrides; set it "
                                     "in one place")
                if key in self.grid or key in self.seed_keys:
                    what = "grid axis" if key in self.grid else "seed key"
                    raise ValueError(f"'sweep.{method}': '{key}' is also a {what}")
        for name, interp in self.interpolate.items():
            where = f"'interpolate.{name}'"
            if not _NAME.match(name) or name in self.methods:
                raise ValueError(f"{where}: the name must be a new method name (letters, digits and _ . + -)")
            if interp.of not in self.methods:
                raise ValueError(f"{where}: 'of' must name a trained method of the study, got {interp.of!r}")
            axes = self.sweep.get(interp.of, {})
            if set(interp.at) != set(axes):
                raise ValueError(f"{where}: 'at' must give a value for each sweep key of '{interp.of}' "
                                 f"({', '.join(axes) or 'none'}), got {', '.join(interp.at) or 'none'}")
            for key, value in interp.at.items():
                if value not in axes[key]:
                    raise ValueError(f"{where}: 'at.{key}': {value!r} is not a value of the sweep of '{interp.of}'")
        if self.reference is not None and self.reference not in self.methods:
            raise ValueError(f"'reference': {self.reference!r} is not a method of the study")
        reference = self.reference_method
        if reference in self.sweep and self.select is None:
            raise ValueError(f"'sweep.{reference}': the reference method sweeps, so 'select' must say which of "
                             "its points the others are compared with (chosen on validation)")
        for i, entry in enumerate(self.exclude):
            if not entry:
                raise ValueError(f"'exclude.{i}': an empty entry would leave out every cell")
            for key, value in entry.items():
                if key not in self.grid:
                    raise ValueError(f"'exclude.{i}': '{key}' is not a grid axis")
                if value not in self.grid[key]:
                    raise ValueError(f"'exclude.{i}': {value!r} is not a value of axis '{key}'")
        for key in self.seed_keys:
            setters = [f"method '{m}'" for m, overrides in self.methods.items()
                       if any(o.partition("=")[0] == key for o in overrides)]
            if key in self.grid or setters:
                raise ValueError(f"'seed_keys': '{key}' is set by the seed, so the "
                                 f"{'grid' if key in self.grid else setters[0]} may not set it")
        if self.grid_plot is not None:
            values = self.grid.get(self.grid_plot.x)
            if values is None:
                raise ValueError(f"'grid_plot.x': '{self.grid_plot.x}' is not a grid axis")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ValueError(f"'grid_plot.x': axis '{self.grid_plot.x}' has non-numeric values")
        return self

    @property
    def reference_method(self) -> str | None:
        """The method others are compared with: `reference`, else naive when the study has it."""
        return self.reference or ("naive" if "naive" in self.methods else None)


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        moved = " (now 'tradeoff: {learning: <its y>, forgetting: <its x>}')" if key == "pareto" else ""
        return f"unknown study key '{key}'{moved}"
    if error["type"] == "missing":
        return f"missing study key '{key}'"
    message = error["msg"].removeprefix("Value error, ")
    if not key:  # checks across keys name theirs in the message
        return f"study key {message}"
    return f"study key '{key}': {message}" + ("" if "input" not in error or error["type"] == "value_error"
                                               else f" (got {error['input']!r})")


def load_study(path: str | pathlib.Path, reference: str | None = None) -> StudyConfig:
    """Read and validate a study file; every problem is one TenureError line naming the key.
    `reference` (`tenure study --reference`) replaces the file's reference method."""
    path = pathlib.Path(path)
    tree = read_yaml_mapping(path, "study file", "(base, methods, grid, seeds)")
    if reference is not None:
        tree = {**tree, "reference": reference}
    try:
        study = StudyConfig.model_validate(tree)
    except pydantic.ValidationError as exc:
        raise one_line(exc, str(path), _describe) from None
    base = (path.parent / study.base).resolve()
    if not base.is_file():
        raise TenureError(f"{path}: study key 'base': config file not found: {base}")
    return study


def format_override(key: str, value: Any) -> str:
    """`key=value` that the engine's override parser (YAML) reads back as `value`."""
    if isinstance(value, str):
        try:
            same = yamlfile.load(value) == value
        except yaml.YAMLError:
            same = False
        return f"{key}={value if same and value else json.dumps(value)}"
    return f"{key}={json.dumps(value)}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One combination of the grid's values (no grid: the single cell 'base')."""

    values: tuple[tuple[str, Any], ...]

    @property
    def overrides(self) -> list[str]:
        return [format_override(k, v) for k, v in self.values]

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in self.values) or "base"

    @property
    def slug(self) -> str:
        return "__".join(_slug(f"{k}-{v}") for k, v in self.values) or "base"


def value_text(value: Any) -> str:
    """A short stable text of a sweep value: 1000.0 -> 1000, 1e-05 -> 1e-5, 0.25 -> 0.25."""
    if isinstance(value, float):
        return re.sub(r"e([-+])0*(\d)", lambda m: "e" + ("-" if m[1] == "-" else "") + m[2], f"{value:g}")
    return value if isinstance(value, str) else json.dumps(value)


@dataclasses.dataclass(frozen=True)
class Point:
    """One combination of a method's sweep values (no sweep: the empty point)."""

    values: tuple[tuple[str, Any], ...] = ()

    @property
    def overrides(self) -> list[str]:
        return [format_override(k, v) for k, v in self.values]

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={value_text(v)}" for k, v in self.values)

    @property
    def slug(self) -> str:
        return "__".join(_slug(f"{k}-{value_text(v)}") for k, v in self.values)


def variant_name(method: str, point: Point) -> str:
    """How a (method, sweep point) is named in tables: `ewc[ewc.lambda=1000]`, or just `ewc`."""
    return f"{method}[{point.label}]" if point.values else method


def points(study: StudyConfig, method: str) -> list[Point]:
    axes = study.sweep.get(method, {})
    out = [Point(tuple(pair for axis, value in zip(axes, combo) for pair in axis_pairs(axis, value)))
           for combo in itertools.product(*axes.values())]
    slugs = [p.slug for p in out]
    if len(set(slugs)) != len(slugs):
        raise TenureError(f"study key 'sweep.{method}': two points map to the same directory name; use plainer values")
    return out


def cells(study: StudyConfig) -> list[Cell]:
    keys = list(study.grid)
    combos = itertools.product(*(study.grid[k] for k in keys))
    out = [Cell(tuple(zip(keys, combo))) for combo in combos]
    out = [c for c in out if not any(all(dict(c.values)[k] == v for k, v in entry.items()) for entry in study.exclude)]
    if not out:
        raise TenureError("study key 'exclude': leaves no cell to run")
    slugs = [c.slug for c in out]
    if len(set(slugs)) != len(slugs):
        raise TenureError("study key 'grid': two cells map to the same directory name; use plainer values")
    return out


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the study and the command that produces it."""

    method: str
    cell: Cell
    seed: int
    run_dir: pathlib.Path
    command: tuple[str, ...]
    point: Point = Point()
    source: "Run | None" = None  # an interpolated run's trained run (its command is `tenure interpolate`)
    same_as: "Run | None" = None  # the study's run with this one's config that is trained instead: its results are read

    @property
    def results_dir(self) -> pathlib.Path:
        return (self.same_as or self).run_dir

    @property
    def variant(self) -> str:
        return variant_name(self.method, self.point)

    @property
    def name(self) -> str:
        where = "" if self.cell.slug == "base" else f" [{self.cell.label}]"
        return f"{self.variant} seed {self.seed}{where}"

    @property
    def result(self) -> pathlib.Path:
        return self.results_dir / "forgetting.json"

    @property
    def summary(self) -> pathlib.Path:
        return self.results_dir / "summary.json"


def default_out(study_path: str | pathlib.Path, study: StudyConfig) -> pathlib.Path:
    return pathlib.Path(study.out) if study.out else pathlib.Path("runs/study") / pathlib.Path(study_path).stem


def select_methods(study: StudyConfig, methods: list[str] | None) -> list[str]:
    known = [*study.methods, *study.interpolate]
    if not methods:
        return known
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise TenureError(f"--methods: unknown method {unknown[0]!r}; the study has {', '.join(known)}")
    return list(dict.fromkeys(methods))


def plan_runs(study: StudyConfig, study_path: str | pathlib.Path, out: str | pathlib.Path, *,
              methods: list[str] | None = None, seeds: int | None = None) -> list[Run]:
    """Every (cell, method, sweep point, seed) run, in that nesting order, with its run dir and command.

    Run dirs: ``<out>/<cell slug>/<method>/seed<k>``, or ``<out>/<cell slug>/<method>/<point slug>/seed<k>``
    for a swept method (absolute).
    """
    if seeds is not None and seeds < 1:
        raise TenureError(f"--seeds: must be at least 1, got {seeds}")
    base = str((pathlib.Path(study_path).parent / study.base).resolve())
    out = pathlib.Path(out).resolve()

    def trained(cell: Cell, method: str, point: Point, seed: int) -> Run:
        run_dir = out / cell.slug / method / point.slug / f"seed{seed}"
        command = (sys.executable, "-m", "tenure.engine.cli", "train", base, *study.methods[method],
                   *point.overrides, *cell.overrides, f"run_dir={run_dir}", f"train.seed={seed}",
                   *(f"{key}={seed}" for key in study.seed_keys))
        return Run(method, cell, seed, run_dir, command, point)

    def interpolated(cell: Cell, method: str, alpha: float, seed: int) -> Run:
        interp = study.interpolate[method]
        at = Point(tuple(pair for axis in study.sweep.get(interp.of, {}) for pair in axis_pairs(axis, interp.at[axis])))
        source = trained(cell, interp.of, at, seed)
        point = Point((("alpha", alpha),))
        run_dir = out / cell.slug / method / point.slug / f"seed{seed}"
        command = (sys.executable, "-m", "tenure.engine.cli", "interpolate", str(source.run_dir),
                   "--alphas", repr(alpha), "--as-run", str(run_dir))
        return Run(method, cell, seed, run_dir, command, point, source)

    runs = []
    for cell in cells(study):
        for method in select_methods(study, methods):
            for point in (points(study, method) if method in study.methods else study.interpolate[method].alphas):
                for seed in range(study.seeds if seeds is None else seeds):
                    runs.append(trained(cell, method, point, seed) if method in study.methods
                                else interpolated(cell, method, point, seed))
    return runs


def reuse_equal_runs(runs: list[Run]) -> list[Run]:
    """The runs, where of the trained runs whose configs are equal but for run_dir (one point named
    by two sweeps, e.g. LoRA's rank 16 at lr 1e-3 on a rank curve and on an lr curve) only one is
    trained: the first already finished, else the first planned; the others read its results
    (`same_as`), and an interpolation of any of them reads its weights. Configs are compared as
    written with the overrides applied, before defaults fill in (an explicitly set default can
    switch a section on)."""
    from tenure.engine.config.schema import config_tree

    groups: dict[str, list[Run]] = {}
    for run in (r for r in runs if r.source is None):
        tree = config_tree(run.command[4], list(run.command[5:]))
        tree.pop("run_dir", None)
        groups.setdefault(json.dumps(tree, sort_keys=True, default=str), []).append(run)
    lead_of: dict[pathlib.Path, Run] = {}
    for members in groups.values():
        lead = next((run for run in members if run.result.is_file()), members[0])
        lead_of.update((run.run_dir, lead) for run in members if run is not lead)
    out = []
    for run in runs:
        if run.source is None and run.run_dir in lead_of:
            run = dataclasses.replace(run, same_as=lead_of[run.run_dir])
        elif run.source is not None and run.source.run_dir in lead_of:
            lead = lead_of[run.source.run_dir]
            command = tuple(str(lead.run_dir) if part == str(run.source.run_dir) else part for part in run.command)
            run = dataclasses.replace(run, source=lead, command=command)
        out.append(run)
    return out


def run_config(run: Run):
    """The validated config of a run's `tenure train` command; an error names the study's method
    and point first (the config file it names is the study's base, not where the key was written)."""
    from tenure.engine.config.schema import load_config
    try:
        return load_config(run.command[4], list(run.command[5:]))
    except TenureError as error:
        base, message = run.command[4], str(error)
        message = message.removeprefix(f"{base}: ")
        raise TenureError(f"study method {run.variant!r} (its overrides on {base}): {message}") from None


def share_first_stage(runs: list[Run], out: str | pathlib.Path,
                      planned: list[Run] | None = None) -> tuple[list[Run], list[Run]]:
    """(first-stage runs, the runs) where the runs of one cell and seed whose first stage computes
    the same thing (engine/continual/branch.py: EWC and replay act only from stage B on) train it once, as
    the config cut to that stage in ``<out>/<cell slug>/first_stage/<method>/seed<k>``, and
    branch from it (`branch_from`). `planned`: every run of the study (default `runs`, which may be
    the methods `--methods` picked): the first of all the methods sharing a first stage names its
    directory, so another `--methods` reuses the one trained before."""
    from tenure.engine.continual.branch import first_stage_key
    from tenure.engine.config.schema import Config

    out = pathlib.Path(out).resolve()
    selected = {run.run_dir: run for run in runs}
    groups: dict[tuple, list[tuple[Run, Config]]] = {}
    for run in (r for r in (runs if planned is None else planned) if r.source is None and r.same_as is None):
        cfg = run_config(run)
        key = first_stage_key(cfg)
        if key is not None:
            groups.setdefault((run.cell.slug, run.seed, key), []).append((run, cfg))
    first, branched = [], {}
    for members in groups.values():
        chosen = [run for run, _ in members if run.run_dir in selected]
        if len(members) < 2 or not chosen:
            continue
        lead, cfg = members[0]
        run_dir = out / lead.cell.slug / "first_stage" / lead.method / lead.point.slug / f"seed{lead.seed}"
        stage = cfg.stages[0].model_dump(mode="json", by_alias=True, exclude_none=True)
        command = tuple(f"run_dir={run_dir}" if part.startswith("run_dir=") else part for part in lead.command)
        first.append(Run(lead.method, lead.cell, lead.seed, run_dir,
                         (*command, "stages=" + json.dumps([stage]))))
        for run in chosen:
            mine = selected[run.run_dir]
            branched[run.run_dir] = dataclasses.replace(mine, command=(*mine.command, f"branch_from={run_dir}"))
    return first, [branched.get(run.run_dir, run) for run in runs]


def figure_tasks(figure: str, tasks: list[str]) -> list[str]:
    """The tasks a figure reads: its own for final/change/drop, else every task of the run."""
    prefix, sep, task = figure.partition("/")
    return [task] if sep and prefix + "/" in FIGURE_PREFIXES else list(tasks)


def check_figures(study: StudyConfig, runs: list[Run]) -> None:
    """Refuse, before anything runs, a `select` or `tradeoff` figure naming a task that a staged run
    does not have (found otherwise only once every run has trained), and a selection that would
    read a task without a validation split in a swept method's run (R is on test: choosing on it
    would judge a choice on what chose it), or a task without a test split (R is on validation:
    the tables would report what the choice was made on)."""
    from tenure.engine.config.schema import config_tree

    figures = {"select": study.select, "tradeoff.learning": study.tradeoff.learning,
               "tradeoff.forgetting": study.tradeoff.forgetting}
    per_task = {key: figure for key, figure in figures.items() if figure and figure.startswith(FIGURE_PREFIXES)}
    for run in runs if per_task else ():
        trained = run.source or run  # an interpolated run has its trained run's tasks
        tasks = config_tree(trained.command[4], list(trained.command[5:])).get("tasks")  # names as written; training validates the rest
        if not tasks:  # a single-task run: tabulated by its own figures, never by these
            continue
        for key, figure in per_task.items():
            task = figure.partition("/")[2]
            if task not in tasks:
                raise TenureError(f"study key '{key}': {figure!r} names task {task!r}, which {run.variant} does not "
                                  f"have (its tasks: {', '.join(tasks)})")
    if study.select is None:
        return
    for run in (r for r in runs if r.point.values):  # the points a selection chooses among
        trained = run.source or run  # an interpolated run is scored on its trained run's splits
        cfg = run_config(trained)
        # an lm_eval probe carries no data block: it has no validation split to choose on
        splits = ({name: task.data.validation if task.data else None for name, task in cfg.tasks.items()}
                  if cfg.tasks else {"the task": cfg.data.validation})
        wanted = figure_tasks(study.select, list(splits)) if cfg.tasks else list(splits)
        missing = [t for t in wanted if splits[t] is None]
        if missing:
            raise TenureError(f"study key 'select': {study.select!r} would be chosen on test: {run.variant} has no "
                              f"validation split for {', '.join(missing)} (set tasks.<task>.data.validation, or "
                              "drop 'select')")
        # R (what the tables report) is on validation where a task has no test split
        tests = ({name: task.data.test for name, task in cfg.tasks.items() if task.data} if cfg.tasks
                 else {"the task": cfg.data.test})
        untested = [t for t in wanted if t in tests and tests[t] is None]
        if untested:
            raise TenureError(f"study key 'select': {study.select!r} would be reported on the split it is chosen on: "
                              f"{run.variant} has no test split for {', '.join(untested)}, so its R is on validation "
                              "(set tasks.<task>.data.test, or drop 'select')")
