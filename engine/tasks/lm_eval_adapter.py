"""The lm-evaluation-harness model `tenure`: any tenure checkpoint, HF directory or GGUF file
scored by the harness's tasks on the engine's own jitted forward and greedy decoder.

    tenure lm-eval --model tenure --model_args checkpoint=RUN_DIR --tasks tenure_probes
    lm = TenureLM(checkpoint="smollm2", batch_size=16)   # or TenureLM.of(model, params, tokenizer, max_length=...)
    lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=task_manager_for([...]))

lm-eval 0.4.13 finds models only in its own registry (no entry points), so importing this
module registers `tenure` there; `tenure lm-eval ARGS` imports it and runs lm-eval's CLI.
Requests are scored in batches of `batch_size` rows padded to a few fixed lengths (powers of
two), so a pass compiles the forward a handful of times. Inputs longer than `max_length` are
truncated from the left, as the harness's HF model does; rolling log-likelihoods use the
harness's own windows (`get_rolling_token_windows`, one token of context).
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Never reach for the Hub: a task whose data is not local fails at once (run_harness names it),
# instead of waiting on network timeouts. datasets reads this when it is first imported.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval.models  # noqa: F401  the harness's models go in first: get_model() fills only an empty registry
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from tenure.engine.tasks.kinds import HARNESS_HEAD
from tenure.models.errors import TenureError
from tenure.models.generate import greedy_generate

PROBES_DIR = pathlib.Path(__file__).resolve().parents[2] / "data" / "probes"
SMALLEST_BUCKET = 16


def _bucket(length: int, cap: int) -> int:
    """The padded length of a batch whose longest row has `length` tokens: the next power of
    two (at least SMALLEST_BUCKET), never above `cap`."""
    return min(max(SMALLEST_BUCKET, 1 << max(length - 1, 0).bit_length()), cap)


@functools.partial(jax.jit, static_argnames=("model",))
def _token_scores(params, ids_BxT, mask_BxT, targets_BxT, *, model):
    """Log-probability of each target token and whether it is the argmax. `model` is static, so
    equal models (every run of a study worker) share the compiled forward of each width."""
    batch = {"input_ids": ids_BxT, "attention_mask": mask_BxT}
    logits_BxTxV = model.apply({"params": params}, batch, deterministic=True)["logits"]
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    chosen_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return chosen_BxT, jnp.argmax(logp_BxTxV, axis=-1) == targets_BxT


def max_positions(arch) -> int:
    for field in ("max_position_embeddings", "max_positions"):
        if getattr(arch, field, None):
            return int(getattr(arch, field))
    raise TenureError(f"model: {type(arch).__name__} has no maximum sequence length; pass max_length")


def _causal_model(arch, dtype: str):
    from tenure.models.tasks import ENCODER_FAMILIES, build_task_model
    if type(arch).__name__ in ENCODER_FAMILIES:
        raise TenureError(f"model: {type(arch).__name__} is an encoder; lm-eval scores causal decoders only")
    return build_task_model(arch, "causal_lm", dtype=jnp.dtype(dtype))


def load_pretrained(path: str, dtype: str = "float32") -> tuple[Any, dict, Any, int]:
    """(causal LM model, params, tokenizer, max positions) of an HF directory, GGUF file or alias
    (whatever tenure.models.hf.load_hf reads)."""
    import flax.linen as nn
    from tenure.models.hf import load_hf
    from tenure.models.tasks import graft_pretrained
    arch, backbone, head, tokenizer = load_hf(path)
    if tokenizer is None:
        raise TenureError(f"{path}: no tokenizer beside the model; lm-eval needs one")
    model = _causal_model(arch, dtype)
    sample = {"input_ids": jnp.zeros((1, 8), jnp.int32), "attention_mask": jnp.ones((1, 8), jnp.int32)}
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), sample, deterministic=True))["params"]
    params = nn.unbox(graft_pretrained(shapes, backbone, head))  # every leaf from the file, no random init
    for where, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise TenureError(f"{path}: no weights for {jax.tree_util.keystr(where)} of the causal LM")
    return model, params, tokenizer, max_positions(arch)


def restore_run(path: str, config: str | None = None, dtype: str | None = None) -> tuple[Any, dict, Any, int]:
    """(causal LM model, params, tokenizer, max positions) of a tenure run / checkpoint / step
    directory, restored as `tenure eval` does (best checkpoint, else latest); the run's config is
    the one saved with the checkpoint unless `config` names a YAML file, whose model-defining keys
    must be those the checkpoint was trained with."""
    from tenure.engine.runtime.checkpoint import Checkpointer
    from tenure.engine.tools.commands import restore
    from tenure.engine.config.schema import load_config, saved_config
    if config is not None:
        cfg = load_config(config)
    else:
        ckpt, step = Checkpointer.open(path)
        with ckpt:
            step = step if step is not None else ckpt.latest_step()
            if step is None:
                raise TenureError(f"{ckpt.directory}: no checkpoint steps in this directory")
            extras = ckpt.read_extra(step)
        if not extras.get("config"):
            raise TenureError(f"{ckpt.directory}: step {step} carries no config; pass config=YAML")
        cfg = saved_config(extras, f"{ckpt.step_dir(step)} (its saved config)")
    if dtype is not None:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": dtype})})
    try:
        trainer, sr, params, _ = restore(cfg, path)
    except TenureError as error:
        if config is not None:
            raise
        raise TenureError(f"{error} (relative paths in a run's saved config are read from the directory it "
                          "was trained in: run from there, or pass config=YAML)") from None
    sr.train_iter.close()
    if trainer.tasks.head != HARNESS_HEAD:
        raise TenureError(f"{path}: the run trained a {trainer.tasks.head} head; lm-eval scores causal LMs "
                          "(task kinds causal_lm, sft)")
    return sr.model, params, trainer.backbone.tokenizer, max_positions(trainer.backbone.arch)


def _is_run_dir(path: str) -> bool:
    """A directory without config.json: a tenure run, checkpoints or step directory."""
    directory = pathlib.Path(path).expanduser()
    return directory.is_dir() and not (directory / "config.json").is_file()


# Sampling settings that greedy decoding (do_sample false) ignores, as transformers' generate does.
GREEDY_IGNORES = frozenset({"do_sample", "temperature", "top_p", "top_k"})


@register_model("tenure")
class TenureLM(TemplateLM):
    """model_args: checkpoint (a tenure run / checkpoint / step dir, an HF directory, or anything
    else model.path takes: a .gguf file, an alias), config (the run's YAML, default: the one saved in the
    checkpoint), batch_size (rows per forward, default 16), max_length (tokens per row, default
    the model's maximum), dtype (float32 | bfloat16 compute), max_gen_toks (default 256).
    lm-eval's `device` (its CLI passes cuda:0 by default) and `max_batch_size` do not apply: JAX
    runs on its default backend (JAX_PLATFORMS chooses), and batch sizes are fixed."""

    progress = True  # lm-eval's progress bars; a tenure run's probes follow logging.progress

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def __init__(self, checkpoint: str | None = None, config: str | None = None, batch_size: int | str = 16,
                 max_length: int | str | None = None, dtype: str | None = None, max_gen_toks: int | str = 256,
                 max_batch_size: int | None = None, device: str | None = None) -> None:
        if checkpoint is None:
            raise TenureError("lm-eval model_args: checkpoint=PATH is required (run dir, HF dir, .gguf or alias)")
        if dtype not in (None, "float32", "bfloat16"):
            raise TenureError(f"lm-eval model_args: dtype {dtype!r} is not float32 or bfloat16")
        for name, value in (("batch_size", batch_size), ("max_length", max_length), ("max_gen_toks", max_gen_toks)):
            if value is not None:
                _positive_int(value, name)  # before the model loads
        if _is_run_dir(checkpoint):
            loaded = restore_run(checkpoint, config, dtype)
        else:
            if config is not None:
                raise TenureError("lm-eval model_args: config= applies to a tenure run directory, "
                                  f"not to {checkpoint}")
            loaded = load_pretrained(checkpoint, dtype or "float32")
        self._setup(*loaded, batch_size=batch_size, max_length=max_length, max_gen_toks=max_gen_toks)

    @classmethod
    def of(cls, model, params, tokenizer, *, max_length: int, batch_size: int = 16,
           max_gen_toks: int = 256) -> "TenureLM":
        """The harness model for weights already in memory (a run's probes, tests)."""
        lm = cls.__new__(cls)
        lm._setup(model, params, tokenizer, max_length, batch_size=batch_size, max_length=None,
                  max_gen_toks=max_gen_toks)
        return lm

    def _setup(self, model, params, tokenizer, model_max: int, *, batch_size, max_length, max_gen_toks) -> None:
        super().__init__()
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.batch_size = _positive_int(batch_size, "batch_size")
        self._max_length = _positive_int(max_length, "max_length") if max_length is not None else model_max
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        if tokenizer.eos_token_id is None:
            raise TenureError("lm-eval: the tokenizer has no EOS token (the harness's end-of-text token)")

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "TenureLM":
        accepted = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        unknown = [key for key in arg_dict if key not in accepted]
        if unknown:  # a misspelt key would otherwise be a TypeError from __init__
            raise TenureError(f"lm-eval model_args: unknown key {unknown[0]!r}; the model 'tenure' takes "
                              f"{', '.join(accepted)}")
        # The CLI always passes its own batch_size (default 1); one given in model_args wins.
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "TenureLM":
        from lm_eval.utils import simple_parse_args_string
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # -- what the harness asks of a model ------------------------------------------------------
    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and a rolling window's first token) is conditioned on."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The tokenizer's ids; special tokens as the tokenizer adds them unless told (as the harness's
        HF model), but no second BOS before a text that opens with it (a chat template's output)."""
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False
        flags = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return list(self.tokenizer.encode(string, **flags))

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """`--apply_chat_template`: the prompt as the tokenizer's own chat template writes it."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise TenureError("lm-eval --apply_chat_template: this model's tokenizer has no chat template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy output) per
        (request, context ids, continuation ids); rows longer than max_length + 1 lose their
        oldest context tokens."""
        rows = []
        for _, context_ids, continuation_ids in requests:
            # a context of only spaces encodes to nothing (the harness moves them into the
            # continuation): condition on the prefix token, as an empty context is
            context_ids = context_ids or [self.prefix_token_id]
            if not continuation_ids:
                raise TenureError("lm-eval: a request's continuation is empty after tokenisation")
            if len(continuation_ids) > self.max_length:
                raise TenureError(f"lm-eval: a continuation of {len(continuation_ids)} tokens is longer than "
                                  f"max_length {self.max_length}")
            window = (list(context_ids) + list(continuation_ids))[-(self.max_length + 1):]
            rows.append((window, len(continuation_ids)))
        results = self._score_rows(rows)
        for (request, _, _), result in zip(requests, results):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, result)
        return results

    def _score_rows(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """Each row's tokens predict their successors; its last `n` targets are summed."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = _bucket(max(len(rows[i][0]) - 1 for i in chunk), self.max_length)
            ids_BxT = np.zeros((self.batch_size, width), np.int32)
            mask_BxT = np.zeros((self.batch_size, width), np.int32)
            targets_BxT = np.zeros((self.batch_size, width), np.int32)
            for row, i in enumerate(chunk):  # right padding: every row starts at position 0
                tokens = rows[i][0]
                ids_BxT[row, :len(tokens) - 1] = tokens[:-1]
                targets_BxT[row, :len(tokens) - 1] = tokens[1:]
                mask_BxT[row, :len(tokens) - 1] = 1
            chosen_BxT, greedy_BxT = jax.device_get(_token_scores(self.params, ids_BxT, mask_BxT, targets_BxT,
                                                                     model=self.model))
            for row, i in enumerate(chunk):
                length, count = len(rows[i][0]) - 1, rows[i][1]
                results[i] = (float(chosen_BxT[row, length - count:length].sum(dtype=np.float64)),
                              bool(greedy_BxT[row, length - count:length].all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string, conditioned on `prefix_token_id`, in the harness's
        disjoint windows of at most max_length tokens."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop sequence (`until`, and the EOS text)."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):  # one decoding setting per group
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        outputs: list[str | None] = [None] * len(requests)
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise TenureError("lm-eval: tenure decodes greedily; this task asks for sampling (do_sample=True)")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            new_tokens = int(kwargs.pop("max_gen_toks"))
            unsupported = sorted(set(kwargs) - GREEDY_IGNORES)
            if unsupported:
                raise TenureError(f"lm-eval: generation setting {unsupported[0]}={kwargs[unsupported[0]]!r} is not "
                                  "supported: tenure decodes greedily, with until and max_gen_toks only")
            context_limit = self.max_length - new_tokens
            if context_limit <= 0:
                raise TenureError(f"lm-eval: max_gen_toks {new_tokens} leaves no room for a context within "
                                  f"max_length {self.max_length}")
            contexts = {i: self.tok_encode(requests[i].args[0])[-context_limit:] for i in indices}
            # Rows end early on the stop strings' tokens; the text is still cut at the strings below.
            stop_ids = [ids for ids in (self.tok_encode(text, add_special_tokens=False) for text in until) if ids]
            order = sorted(indices, key=lambda i: -len(contexts[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                width = _bucket(len(contexts[chunk[0]]), context_limit)
                ids_BxL = np.zeros((self.batch_size, width), np.int32)
                mask_BxL = np.zeros((self.batch_size, width), np.int32)
                for row, i in enumerate(chunk):  # left padding: every row's next token is in one column
                    ids_BxL[row, width - len(contexts[i]):] = contexts[i]
                    mask_BxL[row, width - len(contexts[i]):] = 1
                mask_BxL[len(chunk):, -1] = 1  # filler rows decode one dummy token, ignored
                new_BxN = greedy_generate(self.model, self.params, ids_BxL, mask_BxL, new_tokens,
                                          eos_id=self.eot_token_id, pad_id=self.eot_token_id,
                                          stop_sequences=stop_ids)
                for row, i in enumerate(chunk):
                    text = self.tokenizer.decode(new_BxN[row].tolist(), skip_special_tokens=True)
                    outputs[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
        return outputs


def task_manager_for(tasks: list[str]):
    """lm-eval's TaskManager that knows `tasks`: the shipped probes (data/probes) alone when they are
    all probes (indexing lm-eval's thousands of built-in task files takes half a minute), else with
    the built-in tasks too."""
    from lm_eval.tasks import TaskManager
    probes = TaskManager(include_path=str(PROBES_DIR), include_defaults=False)
    if all(task in probes.all_tasks for task in tasks):
        return probes
    return TaskManager(include_path=str(PROBES_DIR))


def offline_error(error: ConnectionError) -> TenureError:
    return TenureError(f"lm-eval task data: {error}; this machine has no network, so only tasks whose data is "
                       "local (dataset_path: json + data_files, e.g. the probes in data/probes) can run")


def run_harness(argv: list[str]) -> int:
    """lm-eval's own command line (`lm-eval run ...`, `ls`, `validate`, or the legacy form without a
    subcommand) with the model `tenure` registered; the shipped probes are on the task path unless
    the arguments give their own --include_path (lm-eval takes one)."""
    from lm_eval.__main__ import cli_evaluate
    argv = list(argv)
    names_tasks = argv[:1] == ["ls"] or any(a in ("--tasks", "-t") or a.startswith("--tasks=") for a in argv)
    if names_tasks and not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(PROBES_DIR)]
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except ConnectionError as error:
        raise offline_error(error) from None
    finally:
        sys.argv = saved
    return 0


def _positive_int(value, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise TenureError(f"lm-eval: {name}={value!r}: expected a positive integer"
                          + (" (tenure has no automatic batch size)" if name == "batch_size" else "")) from None
    if number < 1:
        raise TenureError(f"lm-eval: {name}={value!r}: expected a positive integer")
    return number
