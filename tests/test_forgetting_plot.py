"""forgetting.png (engine/continual/report.py): a panel per R column on its own y axis."""
import warnings

from tenure.engine.continual.report import plot_curves


def test_each_column_gets_its_own_panel_and_direction(tmp_path):
    """A run scoring accuracy, a perplexity and a retrieval probe: three panels titled by the
    column, each y axis spanning its own values (the perplexity's hundreds do not flatten the
    accuracies) and saying which way is better; an eval without a score is a gap, not an error."""
    record = {"tasks": ["A", "B", "probe"], "stages": ["A", "B"],
              "metric": {"A": "accuracy", "B": "perplexity", "probe": "ndcg@10"},
              "direction": {"A": "max", "B": "min", "probe": "max"},
              "curves": [{"step": 0, "stage": 0, "scores": {"A": 0.25, "B": 900.0, "probe": 0.6}},
                         {"step": 10, "stage": 0, "scores": {"A": 0.85, "B": 700.0, "probe": 0.55}},
                         {"step": 20, "stage": 1, "scores": {"A": 0.5, "B": None, "probe": 0.5}},
                         {"step": 30, "stage": 1, "scores": {"A": 0.45, "B": 120.0, "probe": 0.48}}],
              "stage_ends": [10, 30]}
    path = tmp_path / "forgetting.png"
    fig = plot_curves(record, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [ax.get_title() for ax in fig.axes] == ["A", "B", "probe"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["accuracy (higher is better)", "perplexity (lower is better)",
                                                    "ndcg@10 (higher is better)"]
    (a_low, a_high), (b_low, b_high), (p_low, p_high) = (ax.get_ylim() for ax in fig.axes)
    assert 0.2 < a_low < 0.25 and 0.85 < a_high < 0.9      # accuracy's own range
    assert 50 < b_low < 120 and 900 < b_high < 1000
    assert 0.45 < p_low < 0.48 and 0.6 < p_high < 0.65
    # the stage boundary on every panel, the stage names along each top
    for ax in fig.axes:
        assert [line.get_xdata()[0] for line in ax.lines[1:]] == [10]
        assert [t.get_text() for t in ax.texts] == ["A", "B"]


def test_more_columns_than_a_row_wrap_onto_a_second(tmp_path):
    """Four columns: a row of three and one more panel; the grid's unused cells are not drawn."""
    tasks = ["A", "B", "C", "D"]
    record = {"tasks": tasks, "stages": ["A"], "metric": dict.fromkeys(tasks, "accuracy"),
              "direction": dict.fromkeys(tasks, "max"),
              "curves": [{"step": s, "stage": 0, "scores": dict.fromkeys(tasks, 0.1 * s)} for s in (0, 5)],
              "stage_ends": [5]}
    fig = plot_curves(record, tmp_path / "forgetting.png")
    assert [ax.get_title() for ax in fig.axes] == tasks
    assert [ax.get_subplotspec().rowspan.start for ax in fig.axes] == [0, 0, 0, 1]
    assert all(not ax.lines[1:] for ax in fig.axes)          # one stage: no boundary line


def test_a_run_scored_only_at_its_start_and_stage_ends_spans_every_stage(tmp_path):
    """No validation split: the curves hold the start only (R has the rest); the x axis still
    covers the run, so the stage names sit inside it (tight_layout does not give up, no warning)."""
    record = {"tasks": ["A", "B"], "stages": ["A"], "metric": {"A": "accuracy", "B": "accuracy"},
              "direction": {"A": "max", "B": "max"},
              "curves": [{"step": 0, "stage": 0, "scores": {"A": 0.23, "B": 0.22}}], "stage_ends": [40]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_curves(record, tmp_path / "forgetting.png")
    for ax in fig.axes:
        low, high = ax.get_xlim()
        assert low < 0 and 40 < high < 42
