"""Engine vs HF PyTorch parity on one HF directory or GGUF file (what `tenure hf check` runs).

Reference outputs come from the torch environment when it exists (scripts/hf_reference.py,
or scripts/gguf_reference.py for a GGUF file, in a subprocess), else from a committed
`reference.npz` beside the weights (NAME.reference.npz beside NAME.gguf; for the package
aliases `minilm` and `smollm2`, whose weights live in site-packages: tests/fixtures/minilm/,
tests/fixtures/gguf_smollm2/). A GGUF check compares the logits at each prompt's last token
(a 49k vocabulary makes every position's logits too big to commit), the token ids the file's
tokenizer gives the reference prompts and the parameter count.
A NaN or Inf in any compared output, ours or the reference, is a failure. Hidden states
and logits are compared at real (non-pad) tokens only: HF lets pad queries attend, we do
not, and nothing downstream reads pad positions.

Relative error of a tensor = max|engine - ref| / max|ref| (robust to near-zero entries).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from tenure.models.errors import TenureError
from tenure.models.gguf import is_gguf
from tenure.models.hf import GGUF_ALIASES, PACKAGE_ALIASES, load_hf, read_config, resolve_model_dir
from tenure.models.tasks import build_task_model, graft_pretrained

ROOT = Path(__file__).resolve().parents[1]
# Committed reference outputs for models that are not a directory of this repository.
COMMITTED_FIXTURES = {alias: ROOT / "tests" / "fixtures" / "minilm" / "reference.npz" for alias in PACKAGE_ALIASES}
COMMITTED_FIXTURES.update({alias: ROOT / "tests" / "fixtures" / f"gguf_{alias}" / "reference.npz"
                           for alias in GGUF_ALIASES})
KIND_BY_SUFFIX = (("ForSequenceClassification", "seq_cls"), ("ForTokenClassification", "token_cls"),
                  ("ForMaskedLM", "mlm"), ("ForCausalLM", "causal_lm"), ("LMHeadModel", "causal_lm"))


def torch_python() -> Path | None:
    path = Path(os.environ.get("TENURE_TORCH_PYTHON", ROOT / ".torch-venv" / "bin" / "python"))
    return path if path.is_file() else None


def reference_outputs(model_dir: Path, prefer: str = "auto", fixture: Path | None = None) -> tuple[dict, str]:
    """(arrays, source) with source "torch" or the fixture path; TenureError when neither exists.

    `fixture`: where the committed reference.npz is when it is not beside the weights."""
    python = torch_python()
    if python is not None and prefer in ("auto", "torch"):
        script = "gguf_reference.py" if is_gguf(model_dir) else "hf_reference.py"
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "reference.npz"
            proc = subprocess.run([str(python), str(ROOT / "scripts" / script), str(model_dir), str(out)],
                                  capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                # Unreadable weights, or a config whose sizes disagree with them: the engine's own
                # load names the file or tensor (HF's last line points at a report it printed above).
                _engine_loads(model_dir)
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise TenureError(f"{model_dir}: HF reference run failed: {last} (its full output: "
                                  f"{python} scripts/{script} {model_dir} OUT.npz)")
            with np.load(out) as data:
                return dict(data), "torch"
    beside = model_dir.with_suffix(".reference.npz") if is_gguf(model_dir) else model_dir / "reference.npz"
    fixture = beside if fixture is None or not fixture.is_file() else fixture
    if prefer in ("auto", "fixture") and fixture.is_file():
        with np.load(fixture) as data:
            return dict(data), str(fixture)
    raise TenureError(f"{model_dir}: no reference outputs: create the torch environment (.torch-venv, "
                      "see scripts/hf_reference.py) or add reference.npz from it")


def _engine_loads(model_dir: Path) -> None:
    """Fits the weights to the shapes of the engine's model of config.json (traced, not compiled):
    a TenureError naming the file or tensor when they do not fit."""
    arch_cfg, backbone, head, _ = load_hf(model_dir, with_tokenizer=False)
    architecture = (read_config(model_dir).get("architectures") or [""])[0]
    num_labels = head["classifier"]["kernel"].shape[-1] if head and "classifier" in head else 2
    model = build_task_model(arch_cfg, task_kind_for(architecture), num_labels=num_labels,
                             pooling="cls" if hasattr(arch_cfg, "pooler") else "last")
    batch = {"input_ids": np.ones((1, 4), np.int32), "attention_mask": np.ones((1, 4), np.int32)}
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), batch)["params"]))
    graft_pretrained(shapes, backbone, head)


def task_kind_for(architecture: str) -> str:
    for suffix, kind in KIND_BY_SUFFIX:
        if architecture.endswith(suffix):
            return kind
    return "embedding"


def engine_outputs(model_dir: Path, batch: dict, kind: str) -> tuple[list[np.ndarray], np.ndarray | None]:
    """(hidden states [embeddings, layers_0 .. layers_{L-2}, final output], logits or None), fp32."""
    arch_cfg, backbone, head, _ = load_hf(model_dir, with_tokenizer=False)
    num_labels = head["classifier"]["kernel"].shape[-1] if head and "classifier" in head else 2
    pooling = "cls" if hasattr(arch_cfg, "pooler") else "last"
    model = build_task_model(arch_cfg, kind, num_labels=num_labels, pooling=pooling)
    params = nn.unbox(model.init(jax.random.key(0), batch)["params"])
    params = graft_pretrained(params, backbone, head)
    is_stage = lambda mdl, _: mdl.name in ("backbone", "embeddings") or (mdl.name or "").startswith("layers_")
    out, state = model.apply({"params": params}, batch, capture_intermediates=is_stage)
    stages = state["intermediates"]["backbone"]
    num_layers = sum(1 for k in stages if k.startswith("layers_"))
    hidden = [stages["embeddings"]["__call__"][0]]
    hidden += [stages[f"layers_{i}"]["__call__"][0] for i in range(num_layers - 1)]
    hidden.append(stages["__call__"][0])
    logits = out.get("logits") if kind != "embedding" else None
    return [np.asarray(h, np.float32) for h in hidden], None if logits is None else np.asarray(logits, np.float32)


def _diff(ours: np.ndarray, ref: np.ndarray, real: np.ndarray | None) -> tuple[float, float]:
    if ours.shape != ref.shape:
        raise TenureError(f"parity: engine shape {ours.shape} != reference shape {ref.shape}")
    if real is not None:
        ours, ref = ours[real], ref[real]
    max_abs = float(np.max(np.abs(ours - ref)))
    return max_abs, max_abs / max(float(np.max(np.abs(ref))), 1e-30)


@dataclasses.dataclass
class ParityReport:
    """checks: name -> (max_abs, max_rel); ok when every max_rel <= tolerance and no output
    (nonfinite: names of outputs with NaN/Inf at real tokens, ours or the reference) is non-finite."""

    architecture: str
    task_kind: str
    source: str
    tolerance: float
    checks: dict[str, tuple[float, float]]
    nonfinite: list[str] = dataclasses.field(default_factory=list)
    mismatches: list[str] = dataclasses.field(default_factory=list)  # exact checks that failed (GGUF: ids, count)
    matched: list[str] = dataclasses.field(default_factory=list)     # exact checks that passed

    @property
    def max_abs(self) -> float:
        return max(a for a, _ in self.checks.values())

    @property
    def max_rel(self) -> float:
        return max(r for _, r in self.checks.values())

    @property
    def ok(self) -> bool:
        # `nan <= tolerance` is False, and max() over a NaN depends on order: check each.
        return (not self.nonfinite and not self.mismatches
                and all(r <= self.tolerance for _, r in self.checks.values()))

    def summary(self) -> str:
        lines = [f"{self.architecture} ({self.task_kind}) vs {self.source}"]
        lines += [f"  {name:<18} max_abs {a:.3e}  max_rel {r:.3e}" for name, (a, r) in self.checks.items()]
        lines += [f"  {m:<18} equal" for m in self.matched]
        lines += [f"FAIL: {m}" for m in self.mismatches]
        if self.nonfinite:
            lines.append(f"FAIL: non-finite values (NaN/Inf) in {', '.join(self.nonfinite)}")
        else:
            lines.append(f"{'OK' if self.ok else 'FAIL'}: max_rel {self.max_rel:.3e} (tolerance {self.tolerance:.0e}), "
                         f"max_abs {self.max_abs:.3e}")
        return "\n".join(lines)


def _sentence_embeddings(model_dir: Path, batch: dict) -> np.ndarray:
    """The engine's mean-pooled, L2-normalised embeddings (what sentence-transformers gives)."""
    arch_cfg, backbone, head, _ = load_hf(model_dir, with_tokenizer=False)
    model = build_task_model(arch_cfg, "embedding", pooling="mean")
    params = graft_pretrained(nn.unbox(model.init(jax.random.key(0), batch)["params"]), backbone, head)
    return np.asarray(model.apply({"params": params}, batch)["embeddings"], np.float32)


def check_parity(path: str | Path, tolerance: float = 1e-4, prefer: str = "auto") -> ParityReport:
    """Compare engine and HF outputs on the reference batch; prefer: auto | torch | fixture.

    A reference with `hidden_states` (scripts/hf_reference.py) compares every hidden state and
    the logits at real tokens; one with only `embeddings` (the committed MiniLM fixture, from
    sentence-transformers) compares mean-pooled normalised sentence embeddings."""
    model_dir = resolve_model_dir(path)
    ref, source = reference_outputs(model_dir, prefer, COMMITTED_FIXTURES.get(str(path)))
    if is_gguf(model_dir):
        return _check_gguf(model_dir, ref, source, tolerance)
    batch = {k: ref[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids") if k in ref}
    if "hidden_states" not in ref and "embeddings" in ref:
        architecture, kind = "sentence-transformers mean pooling", "embedding"
        outputs = {"embeddings": (_sentence_embeddings(model_dir, batch), ref["embeddings"], None)}
    elif "architecture" not in ref or "hidden_states" not in ref:
        raise TenureError(f"{source}: reference outputs need 'architecture' and 'hidden_states' (or 'embeddings')")
    else:
        architecture = str(ref["architecture"])
        kind = task_kind_for(architecture)
        hidden, logits = engine_outputs(model_dir, batch, kind)
        real = batch["attention_mask"].astype(bool)
        if len(hidden) != len(ref["hidden_states"]):
            raise TenureError(f"parity: engine has {len(hidden)} hidden states, HF {len(ref['hidden_states'])}")
        outputs = {f"hidden_states[{i}]": (ours, theirs, real)
                   for i, (ours, theirs) in enumerate(zip(hidden, ref["hidden_states"]))}
        if logits is not None and "logits" in ref:
            outputs["logits"] = (logits, ref["logits"], real if logits.ndim == 3 else None)
    checks = {name: _diff(ours, theirs, where) for name, (ours, theirs, where) in outputs.items()}
    nonfinite = []
    for name, (ours, theirs, where) in outputs.items():
        for who, array in (("engine", ours), ("reference", theirs)):
            if not np.all(np.isfinite(array if where is None else array[where])):
                nonfinite.append(f"{name} ({who})")
    return ParityReport(architecture, kind, source, tolerance, checks, nonfinite)


def last_token_logits(arch_cfg, backbone: dict, head: dict | None, input_ids: np.ndarray,
                      attention_mask: np.ndarray) -> np.ndarray:
    """The engine's fp32 causal-LM logits [B, V] at each row's last real token (right padding)."""
    batch = {"input_ids": input_ids.astype(np.int32), "attention_mask": attention_mask.astype(np.int32)}
    model = build_task_model(arch_cfg, "causal_lm")
    # Every leaf of a causal LM comes from the file: the init's shapes are all the graft needs.
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), batch)["params"])
    params = graft_pretrained(shapes, backbone, head)
    logits_BxTxV = np.asarray(model.apply({"params": params}, batch)["logits"], np.float32)
    return logits_BxTxV[np.arange(len(input_ids)), attention_mask.sum(1) - 1]


def _check_gguf(path: Path, ref: dict, source: str, tolerance: float) -> ParityReport:
    """Last-token logits, the tokenizer's ids for the reference prompts and the parameter count."""
    missing = [k for k in ("architecture", "prompts", "input_ids", "attention_mask", "last_logits",
                           "num_parameters") if k not in ref]
    if missing:
        raise TenureError(f"{source}: a GGUF reference needs {', '.join(missing)} (scripts/gguf_reference.py)")
    arch_cfg, backbone, head, tokenizer = load_hf(path)
    mismatches, matched = [], []
    for i, prompt in enumerate(ref["prompts"]):
        ours = tokenizer(str(prompt))["input_ids"]
        theirs = ref["input_ids"][i][ref["attention_mask"][i] == 1].tolist()
        if ours != theirs:
            mismatches.append(f"token ids of prompt {i}: engine {ours}, reference {theirs}")
        else:
            matched.append(f"token ids [{i}]")
    count = sum(int(np.size(leaf)) for leaf in jax.tree.leaves({"backbone": backbone, "head": head}))
    if count != int(ref["num_parameters"]):
        mismatches.append(f"parameter count: engine {count:,}, reference {int(ref['num_parameters']):,}")
    else:
        matched.append(f"params {count:,}")
    logits = last_token_logits(arch_cfg, backbone, head, ref["input_ids"], ref["attention_mask"])
    nonfinite = [f"last_logits ({who})" for who, array in (("engine", logits), ("reference", ref["last_logits"]))
                 if not np.all(np.isfinite(array))]
    return ParityReport(str(ref["architecture"]), "causal_lm", source, tolerance,
                        {"last_logits": _diff(logits, ref["last_logits"], None)}, nonfinite, mismatches, matched)


if __name__ == "__main__":
    result = check_parity(sys.argv[1])
    print(result.summary())
    sys.exit(0 if result.ok else 1)
