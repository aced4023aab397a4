"""`tenure study`'s conclusions from synthetic run outputs whose answers are known: sweeps expand
into named points, paired bootstrap intervals (collapsing to a constant difference; matching the
exact bootstrap distribution), forgetting at matched learning (hand-interpolated, "not reached"),
and selection on validation only (never on test).

Every run here is a forgetting.json + summary.json written by hand in the engine's format
(engine/continual/report.py, engine/train/trainer.py); the thing under test is what the study makes of them.
Two tasks A then B: learning = R[B after B] (learning_newest), forgetting = R[A after A] -
R[A after B] (forgetting_max with two stages)."""
import argparse
import itertools
import json
import pathlib

import numpy as np
import pytest
import yaml

from tenure.engine.continual.forgetting_metrics import summarize
from tenure.engine.study import add_study_parser, analyse, run_study
from tenure.engine.study.config import load_study, plan_runs, value_text
from tenure.engine.study.stats import LEVEL
from tenure.models.errors import TenureError

A_AFTER_A = 0.9
ENDS = [10, 20]


def write_study(tmp_path, text: str) -> pathlib.Path:
    (tmp_path / "base.yaml").write_text("run_dir: runs/x\n")
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def write_run(run, learning: float, forgetting: float, validation=None):
    """A finished two-stage run with the given test learning and forgetting; `validation`:
    (learning, forgetting) on the validation split, or None for a run without one."""
    def rows(learn, forget):
        return [[A_AFTER_A, 0.3], [A_AFTER_A - forget, learn]]

    R, start = rows(learning, forgetting), [0.25, 0.25]
    V = rows(*validation) if validation else [[None, None], [None, None]]
    curves = [{"step": 0, "stage": 0, "scores": {"A": 0.25, "B": 0.25}}]
    curves += [{"step": end, "stage": i, "scores": {"A": V[i][0], "B": V[i][1]}} for i, end in enumerate(ENDS)]
    record = {"tasks": ["A", "B"], "stages": ["A", "B"], "metric": {"A": "accuracy", "B": "accuracy"},
              "direction": {"A": "max", "B": "max"}, "start_row": start, "R": R, "curves": curves,
              "stage_ends": ENDS, "summary": summarize(R, start).as_dict()}
    splits = {"test": R[-1], **({"validation": V[-1]} if validation else {})}
    summary = {"baseline": {f"{split}/{t}/accuracy": 0.25 for split in splits for t in "AB"},
               "final": {f"{split}/{t}/accuracy": row[j] for split, row in splits.items() for j, t in enumerate("AB")}}
    run.run_dir.mkdir(parents=True)
    run.result.write_text(json.dumps(record))
    run.summary.write_text(json.dumps(summary))


def tables_of(path, tmp_path):
    study = load_study(path)
    return [table for table, _ in analyse(plan_runs(study, path, tmp_path / "out"), study)]


# ---------------------------------------------------------------- sweeps

def test_a_sweep_expands_into_named_points_with_their_own_run_dirs(tmp_path):
    path = write_study(tmp_path, """
base: base.yaml
seeds: 2
methods:
  naive: []
  lora: [trainable.mode=lora]
sweep:
  lora: {trainable.lora.rank: [4, 16], optim.lr: [1e-4, 1.0e-3]}
""")
    study = load_study(path)
    assert study.sweep["lora"]["optim.lr"] == [1e-4, 1e-3]  # `1e-4` is text to YAML 1.1; a sweep means the number
    runs = plan_runs(study, path, tmp_path / "out")
    assert len(runs) == 2 + 2 * 2 * 2
    lora = [r for r in runs if r.method == "lora"]
    assert list(dict.fromkeys(r.variant for r in lora)) == [
        "lora[trainable.lora.rank=4, optim.lr=0.0001]", "lora[trainable.lora.rank=4, optim.lr=0.001]",
        "lora[trainable.lora.rank=16, optim.lr=0.0001]", "lora[trainable.lora.rank=16, optim.lr=0.001]"]
    last = lora[-1]
    assert last.run_dir == tmp_path / "out" / "base" / "lora" / "trainable.lora.rank-16__optim.lr-0.001" / "seed1"
    assert last.command[4:] == (str(tmp_path / "base.yaml"), "trainable.mode=lora", "trainable.lora.rank=16",
                                "optim.lr=0.001", f"run_dir={last.run_dir}", "train.seed=1")
    assert yaml.safe_load(last.command[7].partition("=")[2]) == 1e-3
    assert runs[0].run_dir == tmp_path / "out" / "base" / "naive" / "seed0" and runs[0].variant == "naive"
    assert [value_text(v) for v in (1e8, 1e-05, 1000.0, 0.25, 16, "exact")] == ["1e8", "1e-5", "1000", "0.25", "16",
                                                                               "exact"]


# ---------------------------------------------------------------- paired intervals

SEED_LEARNING = [0.80, 0.62, 0.91, 0.70, 0.85]     # large seed-to-seed spread, shared by both methods
SEED_FORGETTING = [0.40, 0.20, 0.55, 0.31, 0.47]


def test_a_difference_constant_across_seeds_has_an_interval_of_that_constant(tmp_path):
    """replay = naive - 0.05 learning, - 0.3 forgetting in every seed: paired by seed, the interval
    is exactly that; unpaired, each method's own interval spans the seeds' spread."""
    path = write_study(tmp_path, "base: base.yaml\nseeds: 5\nmethods: {naive: [], replay: [replay.ratio=0.2]}\n")
    for run in plan_runs(load_study(path), path, tmp_path / "out"):
        shift = (-0.05, -0.3) if run.method == "replay" else (0.0, 0.0)
        write_run(run, SEED_LEARNING[run.seed] + shift[0], SEED_FORGETTING[run.seed] + shift[1])
    (table,) = tables_of(path, tmp_path)
    comparison = table["comparison"]
    assert comparison["reference"] == "naive"
    (replay,) = comparison["paired"]
    for key, constant in (("learning_newest", -0.05), ("forgetting_max", -0.3)):
        assert replay[key]["n"] == 5
        assert [replay[key][k] for k in ("mean", "lo", "hi")] == pytest.approx([constant] * 3, abs=1e-12)
    lo, hi = table["rows"][1]["ci"]["forgetting_max"]  # replay's own mean: seeds spread it
    assert hi - lo > 0.1
    assert comparison["comparisons"] == 2


def test_the_paired_interval_is_the_percentile_interval_of_the_bootstrap_distribution(tmp_path):
    """Differences that vary by seed: the interval's ends must be the 2.5% and 97.5% points of the
    exact bootstrap distribution of the mean (all 5^5 equally likely resamples), up to the
    Monte-Carlo error of 10,000 resamples."""
    differences = np.array([0.02, 0.15, -0.05, 0.30, 0.11])
    path = write_study(tmp_path, "base: base.yaml\nseeds: 5\nmethods: {naive: [], ewc: [ewc.lambda=10]}\n")
    for run in plan_runs(load_study(path), path, tmp_path / "out"):
        extra = differences[run.seed] if run.method == "ewc" else 0.0
        write_run(run, SEED_LEARNING[run.seed], SEED_FORGETTING[run.seed] + extra)
    (table,) = tables_of(path, tmp_path)
    (ewc,) = table["comparison"]["paired"]
    estimate = ewc["forgetting_max"]
    assert estimate["mean"] == pytest.approx(differences.mean()) and estimate["n"] == 5
    means = np.sort([differences[list(idx)].mean() for idx in itertools.product(range(5), repeat=5)])
    tail = (1 - LEVEL) / 2
    for end, share in ((estimate["lo"], tail), (estimate["hi"], 1 - tail)):
        below, at_or_below = np.mean(means < end - 1e-12), np.mean(means <= end + 1e-12)
        assert below - 0.01 <= share <= at_or_below + 0.01, (end, share, below, at_or_below)
    assert estimate["lo"] < differences.mean() < estimate["hi"]


# ---------------------------------------------------------------- matched learning

MATCHED = """
base: base.yaml
seeds: 5
methods: {naive: [], ewc: [], l2sp: [], replay: [replay.ratio=0.25]}
sweep:
  ewc: {ewc.lambda: [1e2, 1e3, 1e4]}
  l2sp: {l2sp.alpha: [0.1, 1.0]}
tradeoff: {levels: [0.65, 0.95]}
"""
# (test learning, test forgetting) of each point, before the seed's shift
POINTS = {"naive": (0.80, 0.60), "ewc[ewc.lambda=100]": (0.90, 0.50), "ewc[ewc.lambda=1000]": (0.70, 0.20),
          "ewc[ewc.lambda=10000]": (0.60, 0.10), "l2sp[l2sp.alpha=0.1]": (0.55, 0.05),
          "l2sp[l2sp.alpha=1]": (0.50, 0.02), "replay": (0.75, 0.08)}
LEARNING_SHIFT = [0.01, -0.02, 0.0, 0.02, -0.01]    # a seed moves every method's learning alike (mean 0)
FORGETTING_SHIFT = [0.03, -0.01, 0.02, -0.04, 0.0]


@pytest.fixture
def matched_study(tmp_path):
    path = write_study(tmp_path, MATCHED)
    for run in plan_runs(load_study(path), path, tmp_path / "out"):
        learning, forgetting = POINTS[run.variant]
        write_run(run, learning + LEARNING_SHIFT[run.seed], forgetting + FORGETTING_SHIFT[run.seed])
    return path


def test_forgetting_at_matched_learning_is_interpolated_along_the_sweep(matched_study, tmp_path):
    (table,) = tables_of(matched_study, tmp_path)
    matched = {(m["method"], m["at"]): m for m in table["comparison"]["matched"]}
    # naive learns 0.80; ewc's points sorted by learning: (0.6, 0.1), (0.7, 0.2), (0.9, 0.5), so
    # at 0.80 its forgetting is 0.2 + (0.8 - 0.7) / (0.9 - 0.7) * (0.5 - 0.2) = 0.35, 0.25 below naive's 0.60.
    ewc = matched["ewc", "reference"]
    assert ewc["reached"] and ewc["level_value"] == pytest.approx(0.80) and ewc["n"] == 5
    assert ewc["forgetting"]["mean"] == pytest.approx(0.35)
    # A seed shifts every learning alike and every forgetting alike, so each resample's curve and
    # level move together: the difference is -0.25 in every one of them.
    assert [ewc["difference"][k] for k in ("mean", "lo", "hi")] == pytest.approx([-0.25] * 3, abs=1e-12)
    assert matched["ewc", 0.65]["forgetting"]["mean"] == pytest.approx(0.1 + 0.5 * 0.1)   # between 0.6 and 0.7
    assert "difference" not in matched["ewc", 0.65]                                      # a fixed level: no pair
    assert not matched["ewc", 0.95]["reached"] and matched["ewc", 0.95]["range"] == pytest.approx([0.6, 0.9])
    # l2sp never learns 0.80 (its points: 0.50, 0.55); replay is one point at 0.75: neither is extrapolated.
    l2sp, replay = matched["l2sp", "reference"], matched["replay", "reference"]
    assert not l2sp["reached"] and l2sp["range"] == pytest.approx([0.50, 0.55]) and "forgetting" not in l2sp
    assert not replay["reached"] and replay["range"] == pytest.approx([0.75, 0.75])
    assert not matched["naive", 0.65]["reached"]                                          # one point at 0.80
    # paired differences: 6 rows x (learning, forgetting), plus ewc's matched difference
    assert table["comparison"]["comparisons"] == 13


def test_the_report_shows_intervals_not_reached_and_the_count(matched_study, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="tenure")
    add_study_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    assert run_study(parser.parse_args(["study", str(matched_study), "--aggregate-only", "--out", str(out)])) == 0
    md = (out / "study.md").read_text()
    assert "| ewc[ewc.lambda=1000] | 5 |" in md
    assert "| ewc | naive's (0.800) | 0.350 [" in md and " | -0.250 [-0.250, -0.250] | 5 |" in md
    assert "| l2sp | naive's (0.800) | not reached (learning 0.500–0.550) |  | 5 |" in md
    assert "| ewc | 0.95 | not reached (learning 0.600–0.900) |" in md
    assert "13 comparisons with the reference" in md
    assert "| l2sp | naive's (0.800) | not reached" in capsys.readouterr().out
    document = json.loads((out / "study.json").read_text())
    entries = document["cells"][0]["comparison"]["matched"]
    assert [(m["method"], m["at"]) for m in entries][:4] == [("naive", 0.65), ("naive", 0.95), ("ewc", "reference"),
                                                              ("ewc", 0.65)]
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG" and (out / "tradeoff.png").stat().st_size > 20_000


# ---------------------------------------------------------------- selection on validation

SELECT = """
base: base.yaml
seeds: 3
methods: {naive: [], ewc: []}
sweep:
  naive: {optim.lr: [1.0e-4, 1.0e-3]}
  ewc: {ewc.lambda: [1, 10, 100]}
select: SELECT
"""
# variant -> (test learning, test forgetting, validation learning, validation forgetting)
SCORES = {"naive[optim.lr=0.0001]": (0.70, 0.40, 0.72, 0.38), "naive[optim.lr=0.001]": (0.80, 0.50, 0.86, 0.40),
          "ewc[ewc.lambda=1]": (0.85, 0.10, 0.70, 0.30),      # best on test by ACC and by forgetting
          "ewc[ewc.lambda=10]": (0.75, 0.30, 0.80, 0.20),     # best on validation by ACC
          "ewc[ewc.lambda=100]": (0.60, 0.20, 0.60, 0.05)}    # best on validation by forgetting


@pytest.mark.parametrize("select, ewc_choice, naive_choice", [
    ("acc", "ewc[ewc.lambda=10]", "naive[optim.lr=0.001]"),
    ("forgetting_max", "ewc[ewc.lambda=100]", "naive[optim.lr=0.0001]")])
def test_selection_is_made_on_validation_even_where_test_disagrees(tmp_path, select, ewc_choice, naive_choice):
    path = write_study(tmp_path, SELECT.replace("SELECT", select))
    for run in plan_runs(load_study(path), path, tmp_path / "out"):
        learn, forget, v_learn, v_forget = SCORES[run.variant]
        write_run(run, learn + 0.01 * run.seed, forget, validation=(v_learn + 0.01 * run.seed, v_forget))
    (table,) = tables_of(path, tmp_path)
    comparison = table["comparison"]
    chosen = comparison["selected"]
    assert chosen["ewc"]["variant"] == ewc_choice and chosen["naive"]["variant"] == naive_choice
    # ACC on validation = mean of the last row: (A after B, B after B) = (0.9 - forgetting, learning + 0.01 seed)
    expected = {v: (A_AFTER_A - s[3] + s[2] + 0.01) / 2 if select == "acc" else s[3]
                for v, s in SCORES.items() if v.startswith("ewc")}
    assert chosen["ewc"]["candidates"] == pytest.approx(expected)
    assert comparison["reference"] == naive_choice   # a swept reference is compared at its chosen point
    assert {p["variant"] for p in comparison["paired"]} == {v for v in SCORES if v != naive_choice}


def test_reference_flag_compares_with_another_method_and_keeps_the_study_tables(tmp_path):
    """`--reference ewc`: every method paired with ewc at its point chosen on validation, the tables
    in OUT/vs-ewc/; the study's own tables (vs naive) are not touched; an unknown method is one line."""
    data = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl", "labels": ["x", "y"]}
    path = write_study(tmp_path, SELECT.replace("SELECT", "acc"))
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "model": {"path": "some/model"}, "tasks": {"A": {"kind": "seq_cls", "data": data},
                                                   "B": {"kind": "seq_cls", "data": data}},
        "stages": [{"tasks": ["A"], "steps": 4}, {"tasks": ["B"], "steps": 4}]}))
    out = tmp_path / "out"
    for run in plan_runs(load_study(path), path, out):
        learn, forget, v_learn, v_forget = SCORES[run.variant]
        write_run(run, learn + 0.01 * run.seed, forget, validation=(v_learn + 0.01 * run.seed, v_forget))
    parser = argparse.ArgumentParser(prog="tenure")
    add_study_parser(parser.add_subparsers(dest="command"))
    assert run_study(parser.parse_args(["study", str(path), "--aggregate-only", "--reference", "ewc",
                                        "--out", str(out)])) == 0
    (table,) = json.loads((out / "vs-ewc" / "study.json").read_text())["cells"]
    comparison = table["comparison"]
    assert comparison["reference"] == "ewc[ewc.lambda=10]"          # ewc's validation choice
    assert {p["variant"] for p in comparison["paired"]} == {v for v in SCORES if v != "ewc[ewc.lambda=10]"}
    naive_low = next(p for p in comparison["paired"] if p["variant"] == "naive[optim.lr=0.0001]")
    # paired by seed: forgetting 0.40 against ewc's 0.30 in every seed, so the difference is exactly 0.1
    assert naive_low["forgetting_max"]["mean"] == pytest.approx(0.1)
    assert not (out / "study.json").exists() and (out / "vs-ewc" / "tradeoff.png").is_file()
    with pytest.raises(TenureError, match="'reference': 'joint' is not a method of the study"):
        run_study(parser.parse_args(["study", str(path), "--aggregate-only", "--reference", "joint", "--out", str(out)]))
    with pytest.raises(TenureError, match=r"^--reference ewc: not among --methods \(naive\); the comparison"):
        run_study(parser.parse_args(["study", str(path), "--aggregate-only", "--reference", "ewc", "--methods", "naive",
                                     "--out", str(out)]))


def test_a_selection_that_would_read_test_is_refused_before_anything_runs(tmp_path):
    data = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl", "labels": ["x", "y"]}
    base = {"model": {"path": "some/model"},
            "tasks": {"A": {"kind": "seq_cls", "data": data},
                      "B": {"kind": "seq_cls", "data": {**data, "validation": None}},
                      "probe": {"kind": "lm_eval", "tasks": ["tenure_format"]}},  # no data block at all
            "stages": [{"tasks": ["A"], "steps": 4}, {"tasks": ["B"], "steps": 4}]}
    path = write_study(tmp_path, SELECT.replace("SELECT", "acc"))
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    parser = argparse.ArgumentParser(prog="tenure")
    add_study_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    with pytest.raises(TenureError) as caught:
        run_study(parser.parse_args(["study", str(path), "--out", str(out)]))
    assert str(caught.value) == ("study key 'select': 'acc' would be chosen on test: naive[optim.lr=0.0001] has no "
                                 "validation split for B, probe (set tasks.<task>.data.validation, or drop 'select')")
    assert not out.exists()  # refused before running
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(base))
    only_a = write_study(tmp_path, SELECT.replace("SELECT", "final/A").replace("base.yaml", "b.yaml"))
    with pytest.raises(TenureError, match="no run finished"):  # final/A reads A only, which has validation
        run_study(parser.parse_args(["study", str(only_a), "--aggregate-only", "--out", str(out)]))
    # The other side: without a test split, R (what the tables report) is on validation, the split chosen on.
    base["tasks"]["A"]["data"] = {**data, "test": None}
    base["eval"] = {"mixed_splits": True}  # R's columns on validation (A) and test (B, probe), accepted
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(TenureError) as caught:
        run_study(parser.parse_args(["study", str(only_a), "--out", str(tmp_path / "out2")]))
    assert str(caught.value) == ("study key 'select': 'final/A' would be reported on the split it is chosen on: "
                                 "naive[optim.lr=0.0001] has no test split for A, so its R is on validation (set "
                                 "tasks.<task>.data.test, or drop 'select')")
    assert not (tmp_path / "out2").exists()


def test_a_figure_naming_a_task_no_run_has_is_refused_before_anything_runs(tmp_path):
    data = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl", "labels": ["x", "y"]}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "model": {"path": "some/model"}, "tasks": {"A": {"kind": "seq_cls", "data": data},
                                                   "B": {"kind": "seq_cls", "data": data}},
        "stages": [{"tasks": ["A"], "steps": 4}, {"tasks": ["B"], "steps": 4}]}))
    parser = argparse.ArgumentParser(prog="tenure")
    add_study_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    for text, message in (
            (SELECT.replace("SELECT", "final/Z"),
             "study key 'select': 'final/Z' names task 'Z', which naive[optim.lr=0.0001] does not have "
             "(its tasks: A, B)"),
            ("base: base.yaml\nmethods: {naive: []}\ntradeoff: {learning: final/B, forgetting: drop/Z}\n",
             "study key 'tradeoff.forgetting': 'drop/Z' names task 'Z', which naive does not have (its tasks: A, B)"),
            ("base: base.yaml\nmethods: {naive: [], ewc: [ewc.lamda=100]}\n",  # a method's misspelt key
             f"study method 'ewc' (its overrides on {tmp_path / 'base.yaml'}): unknown config key 'ewc.lamda'")):
        path = tmp_path / "study.yaml"
        path.write_text(text)
        with pytest.raises(TenureError) as caught:
            run_study(parser.parse_args(["study", str(path), "--out", str(out)]))
        assert str(caught.value) == message
        assert not out.exists() or not any(out.iterdir())  # refused before running


def test_a_run_without_validation_scores_cannot_be_selected_on(tmp_path):
    path = write_study(tmp_path, SELECT.replace("SELECT", "acc"))
    runs = plan_runs(load_study(path), path, tmp_path / "out")
    for run in runs:
        learn, forget, v_learn, v_forget = SCORES[run.variant]
        write_run(run, learn, forget, validation=None if run.variant == "ewc[ewc.lambda=10]" else (v_learn, v_forget))
    with pytest.raises(TenureError, match=r"ewc/ewc.lambda-10/seed0: no validation value of 'acc'"):
        tables_of(path, tmp_path)


def test_methods_without_a_sweep_need_no_validation_split(tmp_path):
    """Only a swept method's points are chosen among; naive without validation is still the reference."""
    path = write_study(tmp_path, SELECT.replace("SELECT", "acc").replace("  naive: {optim.lr: [1.0e-4, 1.0e-3]}\n", ""))
    for run in plan_runs(load_study(path), path, tmp_path / "out"):
        learn, forget, v_learn, v_forget = SCORES.get(run.variant, (0.8, 0.5, None, None))
        write_run(run, learn, forget, validation=None if run.method == "naive" else (v_learn, v_forget))
    (table,) = tables_of(path, tmp_path)
    assert table["comparison"]["selected"]["ewc"]["variant"] == "ewc[ewc.lambda=10]"
    assert table["comparison"]["reference"] == "naive" and "naive" not in table["comparison"]["selected"]


def test_interpolation_between_points_and_at_tied_learning():
    """Hand values: points given out of order; of two points at the same learning the one that
    forgets less is the envelope's (so the answer does not depend on the sweep's order)."""
    from tenure.engine.study.stats import interpolate_rows
    x_BxP = np.array([[0.9, 0.6, 0.7], [0.5, 0.5, 0.8], [0.5, 0.5, 0.8]])
    y_BxP = np.array([[0.5, 0.1, 0.2], [0.0, 0.2, 0.4], [0.2, 0.0, 0.4]])
    got = interpolate_rows(x_BxP, y_BxP, np.array([0.8, 0.5, 0.65]))
    assert got[0] == pytest.approx(0.2 + 0.5 * 0.3)          # between (0.7, 0.2) and (0.9, 0.5)
    assert got[1] == pytest.approx(0.0)                      # at the tie: the point forgetting 0.0
    assert got[2] == pytest.approx(0.0 + 0.5 * 0.4)          # from (0.5, 0.0) toward (0.8, 0.4)
    outside = interpolate_rows(x_BxP, y_BxP, np.array([0.95, 0.4, 0.81]))
    assert np.isnan(outside).all()                           # not reached: no extrapolation


def test_interpolation_skips_points_beaten_on_both_axes():
    """A sweep point that learns less AND forgets more than another (a too-high lr) is not on the
    trade-off curve: interpolating through it would overstate the method's forgetting."""
    from tenure.engine.study.stats import dominated_rows, interpolate_rows
    x_1xP = np.array([[0.6, 0.7, 0.9, 0.8]])
    y_1xP = np.array([[0.1, 0.6, 0.5, 0.3]])                  # (0.7, 0.6) is beaten by (0.8, 0.3)
    assert dominated_rows(x_1xP, y_1xP, True).tolist() == [[False, True, False, False]]
    got = interpolate_rows(np.repeat(x_1xP, 4, 0), np.repeat(y_1xP, 4, 0), np.array([0.7, 0.85, 0.6, 0.65]))
    assert got == pytest.approx([0.1 + 0.5 * 0.2, 0.3 + 0.5 * 0.2, 0.1, 0.1 + 0.25 * 0.2])
    # learning as perplexity (lower learns more): the same points mirrored, the same answers
    got = interpolate_rows(-np.repeat(x_1xP, 4, 0), np.repeat(y_1xP, 4, 0), -np.array([0.7, 0.85, 0.6, 0.65]),
                           higher_learns_more=False)
    assert got == pytest.approx([0.2, 0.4, 0.1, 0.15])
    # one point beats all the others: a level between them costs that point's forgetting
    flat = interpolate_rows(np.array([[0.5, 0.9]]), np.array([[0.4, 0.2]]), np.array([0.7]))
    assert flat == pytest.approx([0.2])


PERPLEXITY = """
base: base.yaml
seeds: 3
methods: {naive: [], lora: []}
sweep:
  lora: {optim.lr: [1.0e-4, 1.0e-3, 1.0e-2]}
tradeoff: {learning: final/B, forgetting: forgetting_max, levels: [18]}
"""


def test_matched_learning_on_a_lower_is_better_figure_uses_the_envelope(tmp_path):
    """Learning as a loss-like figure (lower learns more: task B's final test score with direction
    min, as a perplexity): lora's lr-1e-2 point learns less than its lr-1e-3 and forgets more, so
    the study skips it, says so, and matches along (20, 0.05)-(16, 0.25)."""
    path = write_study(tmp_path, PERPLEXITY)
    points = {"naive": (17.0, 0.30), "lora[optim.lr=0.0001]": (20.0, 0.05), "lora[optim.lr=0.001]": (16.0, 0.25),
              "lora[optim.lr=0.01]": (18.5, 0.60)}
    for run in plan_runs(load_study(path), path, tmp_path / "out"):
        write_run(run, *points[run.variant])
        record = json.loads(run.result.read_text())
        run.result.write_text(json.dumps({**record, "direction": {"A": "max", "B": "min"}}))
    (table,) = tables_of(path, tmp_path)
    matched = {(m["method"], m["at"]): m for m in table["comparison"]["matched"] if m["method"] == "lora"}
    at_18 = matched["lora", 18]
    assert at_18["reached"] and at_18["dominated"] == ["lora[optim.lr=0.01]"]
    assert at_18["forgetting"]["mean"] == pytest.approx(0.05 + 0.5 * 0.20)   # not via (18.5, 0.60)
    at_naive = matched["lora", "reference"]                                  # naive's 17.0
    assert at_naive["forgetting"]["mean"] == pytest.approx(0.05 + 0.75 * 0.20)
    assert at_naive["difference"]["mean"] == pytest.approx(0.20 - 0.30)
    from tenure.engine.study.aggregate import comparison_markdown
    assert "Skipped as beaten on both axes (means over seeds): lora[optim.lr=0.01]." in comparison_markdown(table)


def test_labels_of_points_on_one_another_do_not_overlap():
    """Two methods' points at the same place (a rank sweep's point that is another method's lr
    point) and a third beside them: every label lands where no other label is."""
    from tenure.engine.study.plots import _place_labels, _pyplot
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 3), dpi=110)
    ax.plot([0, 1], [0, 1])
    labels = [("rank=16, alpha=32", (0.5, 0.5), "g"), ("lr=0.001", (0.5, 0.5), "b"), ("lr=0.003", (0.51, 0.5), "r")]
    _place_labels(fig, ax, labels)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert [t.get_text() for t in ax.texts] == [text for text, _, _ in labels]
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    plt.close(fig)


def test_figure_directions_follow_what_each_figure_measures(tmp_path):
    """BWT and FWT are oriented by the engine (> 0 is better for any metric), forgetting is worse,
    the newest task's learning follows that task's metric, and a mean over tasks of opposite
    directions has none: a selection on it is refused in one line, not made the wrong way."""
    from tenure.engine.study.compare import figure_direction

    both_min = {"direction": {"A": "min", "B": "min"}, "newest": "B"}
    mixed = {"direction": {"A": "max", "B": "min"}, "newest": "B"}
    assert [figure_direction(f, both_min) for f in ("bwt", "fwt", "forgetting_max", "acc", "learning_newest")] == [
        "max", "max", "min", "min", "min"]  # bwt and fwt were "min" here: select: bwt chose the most forgetting
    assert [figure_direction(f, mixed) for f in ("learning_newest", "final/A", "acc", "learning_diag")] == [
        "min", "max", None, None]           # learning_newest was "max": B's perplexity read as learning
    path = write_study(tmp_path, PERPLEXITY.replace("tradeoff: {learning: final/B", "select: learning_diag\n"
                                                    "tradeoff: {learning: final/B"))
    for run in plan_runs(load_study(path), path, tmp_path / "out"):
        write_run(run, 17.0, 0.3, validation=(17.0, 0.3))
        record = json.loads(run.result.read_text())
        run.result.write_text(json.dumps({**record, "direction": {"A": "max", "B": "min"}}))
    with pytest.raises(TenureError, match=r"^study key 'select': learning_diag is a mean over tasks whose metrics go "
                                          r"opposite ways \(A max, B min\); name one task's figure"):
        tables_of(path, tmp_path)


def test_selection_reads_the_validation_scores_of_the_weights_r_is_taken_from():
    """A run ending on its best checkpoint or a guard's pick: R's row is those weights', and so are
    the validation rows the engine records beside it; the eval at the stage's last step (what
    selection read) belongs to other weights. Runs from before the rows were recorded still read it."""
    from tenure.engine.study.aggregate import ForgettingRecord, ValidationSource, validation_record

    curves = [{"step": 0, "stage": 0, "scores": {"A": 0.25}}, {"step": 3, "stage": 0, "scores": {"A": 0.53}},
              {"step": 12, "stage": 0, "scores": {"A": 0.47}}]
    record = {"tasks": ["A", "B"], "stages": ["A"], "metric": {"A": "accuracy", "B": "accuracy"},
              "direction": {"A": "max", "B": "max"}, "R": [[0.51, 0.0]], "curves": curves, "stage_ends": [12]}
    source = ValidationSource(baseline={"validation/A/accuracy": 0.25}, final={})
    recorded = validation_record(ForgettingRecord(**record, R_validation=[[0.53, None]]), source)
    assert recorded.R == [[0.53, None]] and recorded.start_row == [0.25, None]
    assert validation_record(ForgettingRecord(**record), source).R == [[0.47, None]]  # older runs: the last eval
