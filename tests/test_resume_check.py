"""Config drift on resume: breaking changes are named, safe ones become notes."""
import copy

from tenure.engine.config.schema import to_dict, validate
from tenure.engine.config.plan import plan
from tenure.engine.runtime.resume_check import (compare_for_eval, compare_for_resume, drift_message,
                                                eval_drift_message, flatten, model_tree)

BASE = {"model": {"path": "minilm"}, "task": {"kind": "seq_cls"},
        "data": {"train": "t.jsonl", "validation": "v.jsonl", "batch_size": 8, "max_length": 64},
        "optim": {"lr": 1e-3}, "train": {"steps": 100, "seed": 1, "eval_every": 10}}


def config(**changes) -> dict:
    tree = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = tree
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return to_dict(validate(tree))


def test_identical_configs_and_labels_pass_silently():
    assert compare_for_resume(config(), config(), '{"labels": ["neg", "pos"]}', ["neg", "pos"]) == ([], [])


def test_breaking_keys_are_named_with_both_values():
    breaking, notes = compare_for_resume(
        config(), config(data__batch_size=16, optim__lr=1e-4, data__max_length=128, train__seed=2,
                         model__path="other", task__kind="pair_cls", optim__name="sgd"))
    assert breaking == ["data.batch_size: 8 -> 16", "data.length_buckets: [32, 64] -> [32, 64, 128]",
                        "data.max_length: 64 -> 128", "model.path: \"minilm\" -> \"other\"",
                        "optim.lr: 0.001 -> 0.0001", "optim.name: \"adamw\" -> \"sgd\"",
                        "task.kind: \"seq_cls\" -> \"pair_cls\"", "train.seed: 1 -> 2"]
    assert notes == []


def test_safe_changes_are_notes():
    breaking, notes = compare_for_resume(
        config(), config(train__steps=200, train__eval_every=50, logging__progress=False,
                         checkpoint__keep=5, data__validation="v2.jsonl", run_dir="runs/moved"))
    assert breaking == []
    assert [n.split(":")[0] for n in notes] == ["checkpoint.keep", "data.validation", "logging.progress",
                                                "run_dir", "train.eval_every", "train.steps"]
    assert notes[-1].startswith("train.steps: 100 -> 200 (the run continues")


def test_more_steps_or_patience_for_a_stage_that_stopped_early_say_it_is_not_trained_further():
    _, notes = compare_for_resume(config(), config(train__steps=200, train__early_stopping={"patience": 5}),
                                  stopped_stage=0)
    assert [n.split(" (")[0] for n in notes] == ["train.early_stopping.patience: 0 -> 5", "train.steps: 100 -> 200"]
    assert all(n.endswith("(the stage the run resumes in stopped early: it is not trained further; "
                          "--restart trains it anew)") for n in notes)
    # A later stage's steps still continue when an earlier stage stopped early.
    saved, new = {"stages": [{"steps": 10}, {"steps": 10}]}, {"stages": [{"steps": 10}, {"steps": 20}]}
    assert "(the run continues" in compare_for_resume(saved, new, stopped_stage=0)[1][0]
    assert "stopped early" in compare_for_resume(saved, new, stopped_stage=1)[1][0]


def test_fewer_steps_or_switching_to_epochs_breaks():
    breaking, _ = compare_for_resume(config(), config(train__steps=50))
    assert breaking[0].startswith("train.steps: 100 -> 50 (fewer steps")
    breaking, _ = compare_for_resume(config(), config(train__steps=None, data__num_epochs=2))
    assert breaking == ["data.num_epochs: null -> 2", "train.steps: 100 -> null"]


def test_labels_must_match_in_order():
    breaking, _ = compare_for_resume(config(), config(), '{"labels": ["neg", "pos"]}', '{"labels": ["pos", "neg"]}')
    assert breaking == ['labels: ["neg", "pos"] -> ["pos", "neg"] (classifier rows follow the label order)']
    breaking, _ = compare_for_resume(config(), config(), ["a", "b"], ["a", "b", "c"])
    assert len(breaking) == 1


def test_unknown_sections_compare_generically():
    saved = {"stages": [{"name": "a", "steps": 10, "data": {"train": "a.jsonl"}}], "tasks": {"a": {"kind": "seq_cls"}}}
    new = {"stages": [{"name": "a", "steps": 20, "data": {"train": "a.jsonl", "validation": "v"}},
                      {"name": "b", "steps": 5}], "tasks": {"a": {"kind": "seq_cls"}}}
    breaking, notes = compare_for_resume(saved, new)
    assert breaking == ["stages.1.name: unset -> \"b\"", "stages.1.steps: unset -> 5"]
    assert [n.split(" (")[0] for n in notes] == ["stages.0.data.validation: unset -> \"v\"",
                                                 "stages.0.steps: 10 -> 20"]
    assert flatten({"a": {"b": [1, 2]}, "c": []}) == {"a.b": [1, 2], "c": []}


def test_drift_message_is_one_line():
    message = drift_message(["optim.lr: 0.001 -> 0.0001", "data.batch_size: 8 -> 16"], "runs/x")
    assert message == ("runs/x: the config differs from the checkpoint's in 2 keys that change the run: "
                       "optim.lr: 0.001 -> 0.0001; data.batch_size: 8 -> 16; restore them, or start over "
                       "with --restart (the old run is moved aside)")


def test_keys_added_to_the_engine_since_the_checkpoint_are_not_changes():
    """A checkpoint written before `data.group_by_length` existed resumes when the key is at its
    default (what that run did); set to something else, it is a change like any other."""
    from tenure.engine.config.schema import as_today
    saved = config()
    del saved["data"]["group_by_length"]
    assert compare_for_resume(saved, config())[0] == ["data.group_by_length: unset -> 0"]
    assert compare_for_resume(as_today(saved), config()) == ([], [])
    assert compare_for_resume(as_today(saved), config(data__group_by_length=8))[0] == ["data.group_by_length: 0 -> 8"]
    garbled = dict(saved, optim={"lr": "fast"})
    assert as_today(garbled) is garbled


def test_a_replay_run_saved_before_replay_loss_existed_keeps_its_loss():
    """Such a run trained with the separate replay loss: resuming it under today's default (one
    mean) is a change the resume check names, not a silent switch; a run without replay, or
    one that says `replay.loss: separate`, resumes as before."""
    from tenure.engine.config.schema import as_today
    old = config(replay__ratio=0.25)
    del old["replay"]["loss"]
    assert compare_for_resume(as_today(old), config(replay__ratio=0.25))[0] == ['replay.loss: "separate" -> "mean"']
    assert compare_for_resume(as_today(old), config(replay__ratio=0.25, replay__loss="separate")) == ([], [])
    no_replay = config()
    del no_replay["replay"]["loss"]
    assert compare_for_resume(as_today(no_replay), config()) == ([], [])


# -- tenure eval / export: the model must be the one the checkpoint holds ----------------------------------------

def test_eval_compares_only_the_keys_that_define_the_model():
    assert compare_for_eval(config(), config(data__batch_size=16, data__validation="v2.jsonl", optim__lr=1e-4,
                                             train__steps=7, task__max_new_tokens=5, eval__metric="f1_macro",
                                             trainable__lora__dropout=0.1, checkpoint__keep=5,
                                             model__dtype="bfloat16", model__remat="full")) == []  # how, not what
    assert compare_for_eval(config(), config(task__pooling="mean", model__path="other", trainable__mode="lora",
                                             trainable__lora__rank=4, heads="shared")) == [
        'heads: trained "per_task", given "shared"', 'model.path: trained "minilm", given "other"',
        'task.pooling: trained null, given "mean"', 'trainable.lora.rank: trained 8, given 4',
        'trainable.mode: trained "full", given "lora"']


def test_eval_compares_a_staged_runs_trainability_as_each_stage_trained():
    """A stage's trainable keys override the top-level section's: `{mode: full}` and `{last_n: 1}`
    write out the same stage dict, but only the first trains without LoRA under `mode: lora`."""
    def staged(stage_trainable: dict) -> dict:
        cfg = validate({"model": {"path": "minilm"}, "trainable": {"mode": "lora"},
                        "tasks": {"A": {"kind": "seq_cls", "data": {"train": "a.jsonl"}}},
                        "stages": [{"tasks": ["A"], "steps": 2, "trainable": stage_trainable}]})
        return model_tree(to_dict(cfg), plan(cfg).computed)
    assert compare_for_eval(staged({"mode": "full"}), staged({"last_n": 1})) == [
        'stages.0.trainable.mode: trained "full", given "lora"']
    changed_data = staged({"mode": "full"})
    changed_data["tasks"]["A"]["data"]["test"] = "t.jsonl"
    assert compare_for_eval(staged({"mode": "full"}), changed_data) == []
    assert eval_drift_message(['task.pooling: trained "cls", given "mean"'], "runs/x/checkpoints") == (
        'runs/x/checkpoints: the config differs from the one the checkpoint was trained with in 1 key that defines '
        'the model: task.pooling: trained "cls", given "mean"; evaluate or export the checkpoint with the config it '
        "was trained with")
