"""A config rebuilt from what a checkpoint saves is the config it was trained with: the same
values and the same keys set (a regulariser is on when its strength is set, even to 0), so
`tenure interpolate` and lm-eval restore a run with the stages it trained."""
from __future__ import annotations

import json
import pathlib

import pytest

from tenure.engine.config.schema import given, load_config, saved_config, to_dict, validate
from tenure.engine.config.plan import plan
from tenure.engine.config.stages import ewc_on, kl_on, l2sp_on

ROOT = pathlib.Path(__file__).resolve().parents[1]

CASES = {
    "single task": ("configs/tasks/seq_cls.yaml", []),
    "staged, ewc + replay": ("configs/continual/split_lexnames.yaml", ["ewc.lambda=1000", "replay.ratio=0.2"]),
    "staged, zero-strength regularisers": ("configs/continual/split_lexnames.yaml",
                                           ["ewc.lambda=0", "kl.weight=0", "l2sp.alpha=0"]),
    "staged, the forgetting study": ("configs/forgetting/split_lexnames.yaml", []),
    "lora": ("configs/scale/llama3_8b_lora.yaml", []),
}


def saved_extras(cfg) -> dict:
    """The config extras a checkpoint writes, through JSON as the checkpoint stores them."""
    return json.loads(json.dumps({"config": to_dict(cfg), "config_given": given(cfg)}))


def switches(cfg) -> list[tuple[bool, bool, bool]]:
    return [(ewc_on(s), kl_on(s), l2sp_on(s)) for s in plan(cfg).stages]


@pytest.mark.parametrize("case", CASES)
def test_a_config_rebuilt_from_a_checkpoint_is_the_config(case):
    path, overrides = CASES[case]
    cfg = load_config(ROOT / path, overrides)
    rebuilt = saved_config(saved_extras(cfg), "checkpoint")
    assert rebuilt == cfg
    assert given(rebuilt) == given(cfg)
    assert switches(rebuilt) == switches(cfg)
    assert plan(rebuilt).computed == plan(cfg).computed


def test_the_full_dict_alone_turns_on_sections_the_config_never_set():
    """Why checkpoints carry `config_given`: the full dict sets every default, and a regulariser
    whose strength is set is on (at weight 0)."""
    cfg = load_config(ROOT / "configs/continual/split_lexnames.yaml", ["ewc.lambda=1000"])
    assert switches(cfg) == [(True, False, False)] * 2
    assert switches(validate(to_dict(cfg))) == [(True, True, True)] * 2


def test_zero_strength_regularisers_stay_on_after_the_round_trip():
    cfg = load_config(ROOT / "configs/continual/split_lexnames.yaml", ["ewc.lambda=0", "kl.weight=0"])
    assert switches(saved_config(saved_extras(cfg), "checkpoint")) == [(True, True, False)] * 2


def test_a_checkpoint_without_config_given_reads_its_full_dict_without_the_defaults():
    """Checkpoints written before `config_given`: what they set to other than its default is on."""
    cfg = load_config(ROOT / "configs/continual/split_lexnames.yaml", ["ewc.lambda=1000", "replay.ratio=0.2"])
    old = saved_config({"config": to_dict(cfg)}, "checkpoint")
    assert to_dict(old) == to_dict(cfg)
    assert switches(old) == switches(cfg)
    assert plan(old).computed == plan(cfg).computed


def test_a_config_is_resolved_once_and_cannot_change_after(monkeypatch):
    """Validation plans the config; preflight, Trainer and assembly read that plan. A frozen
    config keeps its plan true; a copy with other values is planned again."""
    import tenure.engine.config.plan as plan_module
    resolved = []
    real = plan_module.resolve
    monkeypatch.setattr(plan_module, "resolve", lambda cfg: resolved.append(cfg) or real(cfg))
    cfg = load_config(ROOT / "configs/continual/split_lexnames.yaml", ["ewc.lambda=1000"])
    first = plan(cfg)
    assert plan(cfg) is first and len(resolved) == 1
    with pytest.raises(Exception, match="frozen"):
        cfg.model.path = "another"
    copy = cfg.model_copy(update={"run_dir": "elsewhere"})
    assert plan(copy) is not first and len(resolved) == 2
    assert [s.ewc.lam for s in plan(copy).stages] == [s.ewc.lam for s in first.stages]
