"""Accuracy-matrix summaries against values worked out by hand."""
import math

import numpy as np
import pytest

from tenure.engine.continual import forgetting_metrics as fm

# R[i, j]: accuracy on task j after stage i.
R = np.array([
    [0.90, 0.20, 0.10],
    [0.70, 0.80, 0.30],
    [0.60, 0.85, 0.95],
])
START = np.array([0.50, 0.25, 0.15])


def test_acc_bwt_by_hand():
    assert fm.average_accuracy(R) == pytest.approx((0.60 + 0.85 + 0.95) / 3)
    # BWT = mean over j < T-1 of R[T-1, j] - R[j, j] = ((0.60-0.90) + (0.85-0.80)) / 2
    assert fm.backward_transfer(R) == pytest.approx(-0.125)


def test_fwt_by_hand_with_start_row_as_baseline():
    # FWT = ((R[0,1] - b1) + (R[1,2] - b2)) / 2 = ((0.20-0.25) + (0.30-0.15)) / 2
    assert fm.forward_transfer(R, START) == pytest.approx(0.05)
    summary = fm.summarize(R, start_row=START)
    assert summary.fwt == pytest.approx(0.05)
    # an explicit baseline wins over the start row
    assert fm.summarize(R, start_row=START, baseline=[0, 0, 0]).fwt == pytest.approx((0.20 + 0.30) / 2)
    assert math.isnan(fm.summarize(R).fwt)


def test_forgetting_max_and_first_differ_when_a_task_improves_later():
    # task 1 improves after its own stage (0.80 -> 0.85): negative forgetting under both
    per_max = fm.forgetting_max_per_task(R)
    per_first = fm.forgetting_first_per_task(R)
    np.testing.assert_allclose(per_max[:2], [0.90 - 0.60, 0.80 - 0.85])
    np.testing.assert_allclose(per_first[:2], [0.90 - 0.60, 0.80 - 0.85])
    assert math.isnan(per_max[2]) and math.isnan(per_first[2])

    # task 0 peaks at stage 1, after its own stage: max-based sees more forgetting than first-based
    peaked = np.array([[0.70, 0.1, 0.1], [0.90, 0.8, 0.1], [0.60, 0.8, 0.9]])
    assert fm.forgetting_max_per_task(peaked)[0] == pytest.approx(0.30)
    assert fm.forgetting_first_per_task(peaked)[0] == pytest.approx(0.10)


def test_summary_first_based_forgetting_is_minus_bwt():
    summary = fm.summarize(R, start_row=START)
    assert summary.forgetting_first == pytest.approx(-summary.bwt)
    assert summary.forgetting_max == pytest.approx((0.30 - 0.05) / 2)
    assert summary.as_dict()["acc"] == pytest.approx(0.80)
    assert len(summary.as_dict()["forgetting_max_per_task"]) == 3


def test_no_forgetting_and_total_forgetting():
    perfect = np.tril(np.ones((3, 3)))  # every task learnt fully and kept
    assert fm.backward_transfer(perfect) == 0.0
    assert fm.summarize(perfect).forgetting_max == 0.0
    wiped = np.eye(3)  # each stage erases every earlier task
    assert fm.backward_transfer(wiped) == pytest.approx(-1.0)
    assert fm.summarize(wiped).forgetting_max == pytest.approx(1.0)


def test_single_task_gives_nan_not_an_error():
    summary = fm.summarize([[0.7]])
    assert summary.acc == pytest.approx(0.7)
    assert math.isnan(summary.bwt) and math.isnan(summary.forgetting_max)


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="square"):
        fm.average_accuracy(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="start_row must have shape"):
        fm.summarize(R, start_row=[0.1, 0.2])


def test_lower_is_better_tasks_keep_the_sign_conventions():
    """Perplexity on A (min) then ROUGE-L on B (max), as study 3 records them: A's perplexity
    rising from 150 to 180 is a forgetting of +30 and a BWT of -30; ACC has no meaning across
    directions (NaN); FWT on B is in B's own units."""
    R_mixed = [[150.0, 0.03], [180.0, 0.11]]
    s = fm.summarize(R_mixed, start_row=[2100.0, 0.002], directions=["min", "max"])
    assert s.bwt == pytest.approx(-30.0)
    assert s.forgetting_max == pytest.approx(30.0) and s.forgetting_first == pytest.approx(30.0)
    assert s.fwt == pytest.approx(0.03 - 0.002)
    assert math.isnan(s.acc)
    # without directions the same matrix reads as an improvement on A: the bug this guards
    assert fm.summarize(R_mixed).forgetting_max == pytest.approx(-30.0)


def test_all_lower_is_better_by_hand():
    """Three perplexity tasks; task 0 ends better than after its own stage (negative forgetting)."""
    ppl = [[100.0, 500.0, 400.0], [130.0, 90.0, 450.0], [95.0, 110.0, 80.0]]
    s = fm.summarize(ppl, start_row=[600.0, 600.0, 600.0], directions=["min"] * 3)
    # forgetting (max-based): R[last, j] - min_{l < last} R[l, j]: 95 - 100 = -5, 110 - 90 = 20
    np.testing.assert_allclose(s.forgetting_max_per_task[:2], [-5.0, 20.0])
    np.testing.assert_allclose(s.forgetting_first_per_task[:2], [-5.0, 20.0])
    assert s.forgetting_max == pytest.approx(7.5) and s.bwt == pytest.approx(-7.5)
    # FWT: start minus R[j-1, j] (lower is better): (600 - 500 + 600 - 450) / 2
    assert s.fwt == pytest.approx(125.0)
    assert s.acc == pytest.approx((95.0 + 110.0 + 80.0) / 3)
    with pytest.raises(ValueError, match="directions"):
        fm.summarize(ppl, directions=["min", "lower", "min"])


def test_fwt_against_a_single_task_reference_and_marked_otherwise():
    """With each task's single-task score, FWT = mean_{j>=1} (R[j, j] - ref[j]); without one it is
    GEM's form against the start row and says so (an untrained head on both sides: class-IL gives
    exactly 0, as a task's classes are not in the head before its stage)."""
    single_task = [0.9, 0.85, 0.70]
    summary = fm.summarize(R, start_row=START, reference=single_task)
    assert summary.fwt == pytest.approx(((0.80 - 0.85) + (0.95 - 0.70)) / 2)
    assert summary.fwt_against == "single-task reference"
    assert fm.summarize(R, start_row=START).fwt_against == "vs untrained head"
    assert fm.summarize(R, start_row=START, baseline=[0, 0, 0]).fwt_against == "baseline"
    class_il = np.array([[0.9, 0.0, 0.0], [0.1, 0.8, 0.0], [0.0, 0.1, 0.7]])
    plain = fm.summarize(class_il, start_row=[0.25, 0.0, 0.0])
    assert plain.fwt == 0.0 and plain.fwt_against == "vs untrained head"
    assert fm.summarize(class_il, start_row=[0.25, 0, 0], reference=[0.9, 0.85, 0.75]).fwt == pytest.approx(-0.05)
    # lower-is-better tasks: the reference flips with them (a lower perplexity than alone is > 0)
    s = fm.summarize([[10.0, 50.0], [12.0, 20.0]], reference=[10.0, 25.0], directions=["min", "min"])
    assert s.fwt == pytest.approx(5.0)


def test_stability_gap_by_hand():
    """Stages A, B, C with evaluations inside each: the worst score of each earlier task within a
    stage, its dip from the stage's start, min-ACC (worst since the task's own stage ended) and
    WC-ACC = (1/k) own + (1 - 1/k) min-ACC (De Lange et al. 2023)."""
    c = lambda step, stage, **scores: {"step": step, "stage": stage, "scores": scores}  # noqa: E731
    curves = [c(0, 0, A=0.1, B=0.0, C=0.0), c(5, 0, A=0.8, B=0.0, C=0.0), c(10, 0, A=0.9, B=0.0, C=0.0),
              c(12, 1, A=0.5, B=0.3, C=0.0), c(16, 1, A=0.7, B=0.6, C=0.0), c(20, 1, A=0.8, B=0.8, C=0.0),
              c(22, 2, A=0.6, B=0.4, C=0.2), c(30, 2, A=0.75, B=0.7, C=0.9)]
    gap = fm.stability_gap(curves, [["A"], ["B"], ["C"]])
    assert [g["stage"] for g in gap] == [1, 2]
    b, cc = gap
    assert b["worst_within_stage"] == {"A": 0.5} and b["gap_within_stage"] == {"A": pytest.approx(0.4)}
    assert b["min_acc"] == pytest.approx(0.5)
    assert b["wc_acc"] == pytest.approx(0.5 * 0.8 + 0.5 * 0.5)
    assert cc["worst_within_stage"] == {"A": 0.6, "B": 0.4}
    assert cc["gap_within_stage"] == {"A": pytest.approx(0.2), "B": pytest.approx(0.4)}
    assert cc["min_acc"] == pytest.approx((0.5 + 0.4) / 2)   # A's worst since A: 0.5 (in stage B)
    assert cc["wc_acc"] == pytest.approx(0.9 / 3 + (2 / 3) * 0.45)
    # a lower-is-better task: the worst is the highest perplexity, a dip is a rise
    ppl = [c(0, 0, A=100.0, B=500.0), c(10, 0, A=40.0, B=300.0), c(12, 1, A=55.0, B=200.0), c(20, 1, A=45.0, B=90.0)]
    (g,) = fm.stability_gap(ppl, [["A"], ["B"]], {"A": "min", "B": "min"})
    assert g["worst_within_stage"] == {"A": 55.0} and g["gap_within_stage"] == {"A": pytest.approx(15.0)}
    assert g["min_acc"] == pytest.approx(55.0) and g["wc_acc"] == pytest.approx(0.5 * 90 + 0.5 * 55)
