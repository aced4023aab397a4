"""The lm-eval model `tenure` (engine/tasks/lm_eval_adapter.py) on the tiny random Llama fixture (GQA,
untied head), with max_length 16 so that truncation and rolling windows happen.

References are computed without the adapter: the fixture's HF weights through tenure.models.llama's
decoder on one unpadded sequence at a time, log-softmax in numpy, so batching, padding to
length buckets and left/right alignment in the adapter are all under test."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file
from transformers import AutoTokenizer

from tenure.engine.tasks.lm_eval_adapter import TenureLM, _token_scores, task_manager_for
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from tenure.models import hf_llama
from tenure.models.errors import TenureError
from tenure.models.generate import greedy_generate
from tenure.models.llama import LlamaDecoder

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ROOT / "tests" / "fixtures" / "llama"
MAX_LENGTH = 16
BATCH = 4
REFERENCE_WIDTH = 24
LONG = "the quick brown fox jumps over the lazy dog, then a tiny model learns to forget what it once knew"


@pytest.fixture(scope="module")
def lm():
    return TenureLM(checkpoint=str(LLAMA), batch_size=BATCH, max_length=MAX_LENGTH, max_gen_toks=8)


@pytest.fixture(scope="module")
def reference():
    """(log-probabilities [T, V] of the next token after each of `ids`, tokenizer)."""
    cfg = hf_llama.config_from_hf(json.loads((LLAMA / "config.json").read_text()))
    params = hf_llama.params_from_hf(load_file(LLAMA / "model.safetensors"), cfg)  # untied LM head
    decoder = LlamaDecoder(cfg)

    @jax.jit
    def logits(ids_1xT, mask_1xT):
        hidden = decoder.apply({"params": params["backbone"]}, ids_1xT, mask_1xT)
        return hidden @ params["head"]["lm_head"]["kernel"]

    def logprobs(ids):
        """One row, right-padded to REFERENCE_WIDTH (one compile; causal: padding after does not matter)."""
        ids_1xT, mask_1xT = np.zeros((1, REFERENCE_WIDTH), np.int32), np.zeros((1, REFERENCE_WIDTH), np.int32)
        ids_1xT[0, :len(ids)], mask_1xT[0, :len(ids)] = ids, 1
        out = np.asarray(logits(ids_1xT, mask_1xT)[0, :len(ids)], np.float64)
        top = out.max(-1, keepdims=True)
        return out - top - np.log(np.exp(out - top).sum(-1, keepdims=True))

    return logprobs, AutoTokenizer.from_pretrained(str(LLAMA))


def requests(kind, *arguments):
    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


def expected_loglikelihood(reference, context_ids, continuation_ids):
    """HF's rule: the last max_length + 1 tokens of context + continuation, scored on the continuation."""
    logprobs, _ = reference
    window = (context_ids + continuation_ids)[-(MAX_LENGTH + 1):]
    logp = logprobs(window[:-1])
    n = len(continuation_ids)
    return sum(logp[len(window) - 1 - n + j, t] for j, t in enumerate(continuation_ids))


def test_loglikelihood_matches_a_direct_forward(lm, reference):
    _, tokenizer = reference
    pairs = [("the quick brown", " fox"), ("a tiny model", " learns to forget"), ("", "the lazy dog"),
             (LONG, " again and again")]  # the last is longer than max_length: truncated from the left
    assert len(tokenizer.encode(LONG + " again and again")) > MAX_LENGTH + 1
    got = lm.loglikelihood(requests("loglikelihood", *pairs))
    for (context, continuation), (logprob, _) in zip(pairs, got):
        if context:
            whole, context_ids = tokenizer.encode(context + continuation), tokenizer.encode(context)
            context_ids, continuation_ids = context_ids, whole[len(context_ids):]
        else:  # an empty context is conditioned on the prefix token (BOS)
            context_ids, continuation_ids = [tokenizer.bos_token_id], tokenizer.encode(continuation)
        expected = expected_loglikelihood(reference, context_ids, continuation_ids)
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-5), (context, continuation)


def test_a_second_model_of_equal_structure_reuses_the_compiled_forward(lm):
    """Every run of a study worker builds its own model and TenureLM: equal models share the
    compiled scoring forward of each width (a SmolLM2 run paid about 6 s of compiles for it)."""
    pairs = requests("loglikelihood", ("the quick brown", " fox"), ("a tiny model", " learns"))
    first = lm.loglikelihood(pairs)
    compiled = _token_scores._cache_size()
    again = TenureLM(checkpoint=str(LLAMA), batch_size=BATCH, max_length=MAX_LENGTH, max_gen_toks=8)
    assert again.model is not lm.model and again.loglikelihood(pairs) == first
    assert _token_scores._cache_size() == compiled


def test_greedy_flag(lm, reference):
    logprobs, tokenizer = reference
    context = tokenizer.encode("tokens flow through attention")
    ranked = np.argsort(-logprobs(context)[-1])
    best, second = int(ranked[0]), int(ranked[1])
    ranked_next = np.argsort(-logprobs(context + [best])[-1])
    got = lm._loglikelihood_tokens([(None, context, [best]), (None, context, [second]),
                                    (None, context, [best, int(ranked_next[0])]),
                                    (None, context, [best, int(ranked_next[1])])])
    assert [greedy for _, greedy in got] == [True, False, True, False]


def test_rolling_loglikelihood_is_the_sum_over_the_text(lm, reference):
    """Every token predicted once: the first window from the prefix token, then windows of
    max_length predictions, the last one with a full max_length of context (lm-eval's docstring)."""
    logprobs, tokenizer = reference
    short = "the quick brown fox"
    tokens = tokenizer.encode(LONG)
    assert len(tokens) > 2 * MAX_LENGTH + 3  # three windows, the last one partial
    got_long, got_short = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (LONG,), (short,)))

    short_ids = [tokenizer.bos_token_id] + tokenizer.encode(short)
    expected_short = sum(logprobs(short_ids[:-1])[j, t] for j, t in enumerate(short_ids[1:]))
    assert got_short == pytest.approx(expected_short, rel=1e-5)

    bos = tokenizer.bos_token_id
    expected = sum(logprobs([bos] + tokens[:MAX_LENGTH - 1])[j, t] for j, t in enumerate(tokens[:MAX_LENGTH]))
    done = MAX_LENGTH
    while done < len(tokens):
        end = min(done + MAX_LENGTH, len(tokens))
        window = tokens[end - MAX_LENGTH - 1:end - 1]  # predicts tokens[end - MAX_LENGTH:end]
        logp = logprobs(window)
        expected += sum(logp[MAX_LENGTH - (end - i), tokens[i]] for i in range(done, end))
        done = end
    assert got_long == pytest.approx(expected, rel=1e-5)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_sequence(lm, reference):
    _, tokenizer = reference
    prompts = ["the quick brown", "fine tuning changes weights; regularisers", "a", LONG]
    assert len(prompts) == BATCH
    free = lm.generate_until(requests("generate_until", *[(p, {"until": [], "max_gen_toks": 8}) for p in prompts]))
    width = MAX_LENGTH - 8  # the context keeps room for the new tokens within max_length
    ids_BxW, mask_BxW = np.zeros((len(prompts), width), np.int32), np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):  # in the given order (the adapter sorts by length)
        ids = tokenizer.encode(prompt)[-width:]
        ids_BxW[row, width - len(ids):], mask_BxW[row, width - len(ids):] = ids, 1
    new_BxN = greedy_generate(lm.model, lm.params, ids_BxW, mask_BxW, 8, eos_id=tokenizer.eos_token_id)
    assert free == tokenizer.batch_decode(new_BxN.tolist(), skip_special_tokens=True)
    text = max(free, key=len)
    assert len(text) >= 6
    stop = text[len(text) // 2:len(text) // 2 + 2]
    prompt = prompts[free.index(text)]
    cut, = lm.generate_until(requests("generate_until", (prompt, {"until": [stop], "max_gen_toks": 8})))
    assert cut == text.split(stop)[0] and len(cut) < len(text)


def test_sampling_and_bad_arguments_are_refused(lm):
    with pytest.raises(TenureError, match="greedily"):
        lm.generate_until(requests("generate_until", ("a", {"until": [], "do_sample": True, "temperature": 1.0})))
    with pytest.raises(TenureError, match="batch_size='auto'"):
        TenureLM(checkpoint=str(LLAMA), batch_size="auto")
    with pytest.raises(TenureError, match="not found"):
        TenureLM(checkpoint="/nonexistent/model.gguf")


def test_a_context_that_encodes_to_nothing_is_conditioned_on_the_prefix_token(lm):
    """A context of only spaces reaches the scorer as no tokens (the harness moves them into the
    continuation): it scores as conditioned on the prefix token. It summed an empty slice: log p 0
    and greedy True, so a multiple-choice task always picked that choice."""
    continuation = lm.tok_encode(" the lazy dog", add_special_tokens=False)
    empty, prefixed = lm._loglikelihood_tokens([(None, [], continuation), (None, [lm.prefix_token_id], continuation)])
    assert empty == prefixed and empty[0] < -1.0


def test_generation_settings_greedy_decoding_cannot_honour_are_refused(lm):
    """num_beams, repetition_penalty and the like were dropped without a word; the sampling
    settings greedy decoding ignores (temperature, top_p, top_k) still pass."""
    for setting in ({"num_beams": 4}, {"repetition_penalty": 1.2}, {"min_new_tokens": 3}):
        with pytest.raises(TenureError, match=rf"generation setting {next(iter(setting))}="):
            lm.generate_until(requests("generate_until", ("a", {"until": ["\n"], **setting})))
    out = lm.generate_until(requests("generate_until", ("a", {"until": ["\n"], "temperature": 0.0, "top_p": 1.0})))
    assert out == lm.generate_until(requests("generate_until", ("a", {"until": ["\n"]})))


def test_apply_chat_template_writes_the_tokenizers_template(lm):
    """--apply_chat_template was a traceback (lm-eval's NotImplementedError). A tokenizer without a
    template is one line; with one, the prompt is the template's (its BOS: the next test)."""
    tokenizer = lm.tokenizer
    saved = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        with pytest.raises(TenureError, match="no chat template"):
            lm.apply_chat_template([{"role": "user", "content": "x"}])
        tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                                   "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
        prompt = lm.apply_chat_template([{"role": "user", "content": "hello"}])
        assert prompt == f"{tokenizer.bos_token}<user>hello<assistant>"
    finally:
        tokenizer.chat_template = saved


def test_a_text_that_opens_with_bos_gets_no_second_one(tmp_path):
    """A chat template writes the BOS itself; a tokenizer that adds one (sentencepiece) doubled it."""
    from tests.test_gguf import write_spm_gguf
    from tenure.models.hf import load_hf

    bare = TenureLM.__new__(TenureLM)  # tok_encode reads only the tokenizer
    bare.tokenizer = load_hf(write_spm_gguf(tmp_path / "spm.gguf", True), with_weights=False)[3]
    assert bare.tok_encode("ab c")[0] == bare.tokenizer.bos_token_id
    assert bare.tok_encode("<s>ab c") == bare.tokenizer.encode("<s>ab c", add_special_tokens=False)
    assert bare.tok_encode("<s>ab c").count(bare.tokenizer.bos_token_id) == 1


def test_an_unknown_model_args_key_is_refused_naming_it_and_the_accepted_ones():
    """A misspelt key (`--model_args chekpoint=...`) is one line, not __init__'s TypeError."""
    with pytest.raises(TenureError) as error:
        TenureLM.create_from_arg_string("chekpoint=/some/dir", {"batch_size": 1, "max_batch_size": None,
                                                                "device": None})  # what lm-eval's CLI passes
    assert str(error.value) == ("lm-eval model_args: unknown key 'chekpoint'; the model 'tenure' takes checkpoint, "
                                "config, batch_size, max_length, dtype, max_gen_toks, max_batch_size, device")


def test_harness_scores_a_probe_as_the_adapter_does(lm):
    """simple_evaluate with model 'tenure' (by name, from model_args) on two shipped probes: its
    per-request scores and metrics equal the adapter's own answers to the same requests."""
    limit = 3
    out = simple_evaluate(model="tenure", model_args={"checkpoint": str(LLAMA), "max_length": MAX_LENGTH},
                          batch_size=BATCH, tasks=["tenure_capitals_mc", "tenure_kjv"], limit=limit,
                          log_samples=True, task_manager=task_manager_for(["tenure_capitals_mc", "tenure_kjv"]))
    docs = [json.loads(line) for line in (ROOT / "data/probes/capitals/test.jsonl").open()][:limit]
    pairs = [(f"Q: What is the capital of {d['country']}?\nA:", f" {c}") for d in docs for c in d["choices"]]
    direct = [ll for ll, _ in lm.loglikelihood(requests("loglikelihood", *pairs))]
    harness = [s["resps"][i][0][0] for s in out["samples"]["tenure_capitals_mc"] for i in range(4)]
    np.testing.assert_allclose(harness, direct, rtol=1e-6)
    accuracy = np.mean([np.argmax(direct[4 * i:4 * i + 4]) == d["label"] for i, d in enumerate(docs)])
    assert out["results"]["tenure_capitals_mc"]["acc,none"] == pytest.approx(accuracy)

    texts = [json.loads(line)["text"] for line in (ROOT / "data/probes/kjv/test.jsonl").open()][:limit]
    rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", *[(t,) for t in texts]))
    words = sum(len(t.split()) for t in texts)
    assert out["results"]["tenure_kjv"]["word_perplexity,none"] == pytest.approx(np.exp(-sum(rolling) / words),
                                                                                 rel=1e-6)


@pytest.mark.slow
def test_a_run_dir_scores_as_its_hf_export(tmp_path):
    """checkpoint=RUN_DIR restores the run's last checkpoint from its saved config, as `tenure eval`
    does; its scores equal those of the run's own HF export of the same weights."""
    from tenure.engine.config.schema import load_config
    from tenure.engine.train.trainer import train
    train(load_config(ROOT / "configs/tasks/sft.yaml",
                      [f"run_dir={tmp_path}", "train.steps=1", "train.eval_every=1", "task.generation_examples=0",
                       "data.max_length=32", "data.length_buckets=[32]", "logging.progress=false",
                       "logging.tensorboard=false"]))
    pairs = requests("loglikelihood", ("the quick brown", " fox"), ("a tiny model", " learns to forget"))
    from_run = TenureLM(checkpoint=str(tmp_path), batch_size=BATCH, max_length=MAX_LENGTH).loglikelihood(pairs)
    from_export = TenureLM(checkpoint=str(tmp_path / "hf"), batch_size=BATCH, max_length=MAX_LENGTH).loglikelihood(pairs)
    untrained = TenureLM(checkpoint=str(LLAMA), batch_size=BATCH, max_length=MAX_LENGTH).loglikelihood(pairs)
    np.testing.assert_allclose([ll for ll, _ in from_run], [ll for ll, _ in from_export], rtol=1e-6)
    assert all(abs(a - b) > 1e-4 for (a, _), (b, _) in zip(from_run, untrained))  # the trained weights
    # config=YAML describing another model than the checkpoint holds is refused, naming the key
    other = yaml.safe_load((ROOT / "configs/tasks/sft.yaml").read_text()) | {"trainable": {"mode": "lora", "lora": {"targets": ["q_proj"]}}}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(TenureError, match='trainable.mode: trained "full", given "lora"'):
        TenureLM(checkpoint=str(tmp_path), config=str(tmp_path / "other.yaml"), batch_size=BATCH, max_length=MAX_LENGTH)


def _probe_config(tmp_path, stage_tasks):
    from tenure.engine.config.schema import validate
    return validate({
        "run_dir": str(tmp_path), "model": {"path": str(LLAMA)},
        "tasks": {"defs": {"kind": "sft", "generation_examples": 0, "few_shot": 0,
                           "data": {"train": str(ROOT / "data/wordnet_sft/train.jsonl"),
                                    "test": str(ROOT / "data/wordnet_sft/test.jsonl"),
                                    "max_length": 32, "length_buckets": [32], "batch_size": 8}},
                  "general": {"kind": "lm_eval", "tasks": ["tenure_capitals_mc"], "limit": 4}},
        "stages": [{"tasks": stage_tasks, "steps": 2}],
        "optim": {"lr": 1.0e-2}, "train": {"eval_every": 2},
        "logging": {"progress": False, "tensorboard": False}})


def test_a_staged_run_scores_an_lm_eval_probe_as_the_harness_does_on_its_checkpoint(tmp_path, capfd):
    """An lm_eval task in a staged run is a column of R: scored on the starting model and at the
    stage end, where it equals the harness's score of the run's saved checkpoint (checkpoint=RUN_DIR)."""
    from tenure.engine.train.trainer import train
    train(_probe_config(tmp_path, ["defs"]))
    assert "it/s" not in capfd.readouterr().err  # logging.progress=false: no lm-eval progress bars either
    record = json.loads((tmp_path / "forgetting.json").read_text())
    column = record["tasks"].index("general")
    assert record["metric"]["general"] == "tenure_capitals_mc/acc" and record["split"]["general"] == "test"
    tasks = ["tenure_capitals_mc"]
    scores = {}
    for checkpoint in (str(LLAMA), str(tmp_path)):  # the starting model, the trained one
        out = simple_evaluate(model=TenureLM(checkpoint=checkpoint), tasks=tasks, limit=4, bootstrap_iters=0,
                              log_samples=False, task_manager=task_manager_for(tasks))
        scores[checkpoint] = out["results"]["tenure_capitals_mc"]["acc,none"]
    assert record["start_row"][column] == scores[str(LLAMA)]
    assert record["R"][0][column] == scores[str(tmp_path)]


def test_a_stage_that_trains_an_lm_eval_probe_is_refused(tmp_path):
    with pytest.raises(TenureError, match="'general' is an lm_eval probe, scored but never trained"):
        _probe_config(tmp_path, ["defs", "general"])
    from tenure.engine.config.schema import validate
    base = {"model": {"path": str(LLAMA)}, "stages": [{"tasks": ["general"]}]}
    with pytest.raises(TenureError, match="tasks.general': an lm_eval task reads its data through lm-eval"):
        validate(base | {"tasks": {"general": {"kind": "lm_eval", "tasks": ["tenure_kjv"], "data": {"test": "x"}}}})
    with pytest.raises(TenureError, match="tasks.defs': `limit` applies to kind lm_eval only, not sft"):
        validate(base | {"tasks": {"defs": {"kind": "sft", "limit": 4, "data": {"train": "x"}}}})


def test_a_probes_validation_documents_are_held_out_from_the_ones_r_reads(lm):
    """`eval_limit` documents after R's first `limit`: validation scores capitals documents 4-6,
    as the adapter's own answers to those documents give; more than the probe has is refused."""
    from tenure.engine.tasks.evaluate import LMEvalProbe
    validation = LMEvalProbe(lm, ["tenure_capitals_mc"], 3, after=4, key="tasks.general.eval_limit")
    scores = validation(lm.params, [])
    docs = [json.loads(line) for line in (ROOT / "data/probes/capitals/test.jsonl").open()]
    pairs = [(f"Q: What is the capital of {d['country']}?\nA:", f" {c}") for d in docs[4:7] for c in d["choices"]]
    direct = [ll for ll, _ in lm.loglikelihood(requests("loglikelihood", *pairs))]
    accuracy = np.mean([np.argmax(direct[4 * i:4 * i + 4]) == d["label"] for i, d in enumerate(docs[4:7])])
    assert scores["tenure_capitals_mc/acc"] == pytest.approx(accuracy)
    assert validation._documents(validation.task_manager.load(["tenure_capitals_mc"])) == {
        "samples": {"tenure_capitals_mc": [4, 5, 6]}}
    with pytest.raises(TenureError, match=r"'tasks.kjv.eval_limit': 100 documents after the 60 R reads need 160, "
                                          r"and lm-eval task tenure_kjv has 120"):
        LMEvalProbe(lm, ["tenure_kjv"], 100, after=60, key="tasks.kjv.eval_limit")(lm.params, [])
    from tenure.engine.config.schema import validate
    with pytest.raises(TenureError, match="`eval_limit` needs `limit`"):
        validate({"model": {"path": str(LLAMA)}, "stages": [{"tasks": ["defs"]}],
                  "tasks": {"general": {"kind": "lm_eval", "tasks": ["tenure_kjv"], "eval_limit": 4}}})


def test_a_probes_limit_above_its_documents_is_refused(lm):
    """R's `limit` above a task's documents is refused (the harness would silently score all it has);
    a limit of exactly that many, and `limit: null`, score every document."""
    from types import SimpleNamespace

    from tenure.engine.tasks.evaluate import LMEvalProbe, make_evaluators
    spec = SimpleNamespace(kind="lm_eval", tasks=["tenure_kjv"], limit=100000, eval_limit=None)
    tasks = SimpleNamespace(by_name={"general": SimpleNamespace(task=SimpleNamespace(spec=spec, data=None))})
    probe = make_evaluators(tasks, {"general": lm.model}, None, None, lm.tokenizer)["general"]["test"]
    with pytest.raises(TenureError) as error:
        probe(lm.params, [])
    assert str(error.value) == "config key 'tasks.general.limit': 100000 documents, and lm-eval task tenure_kjv has 120"
    loaded = probe.task_manager.load(["tenure_kjv"])
    assert LMEvalProbe(lm, ["tenure_kjv"], 120)._documents(loaded) == {"limit": 120}
    assert LMEvalProbe(lm, ["tenure_kjv"], None)._documents(loaded) == {"limit": None}


def test_a_probe_scores_as_simple_evaluate_does(lm):
    """LMEvalProbe runs lm-eval's `evaluate` with `simple_evaluate`'s set-up (seeds, few-shot,
    limit), without its `git describe`: every shipped probe's scores equal simple_evaluate's."""
    from tenure.engine.tasks.evaluate import LMEvalProbe
    tasks = ["tenure_capitals_mc", "tenure_capitals_gen", "tenure_format", "tenure_kjv"]
    ours = LMEvalProbe(lm, tasks, 3)(lm.params, [])
    out = simple_evaluate(model=lm, tasks=tasks, limit=3, bootstrap_iters=0, log_samples=False,
                          task_manager=task_manager_for(tasks))
    theirs = {}
    for task in tasks:
        for key, value in out["results"][task].items():
            metric, _, kept = key.partition(",")
            if kept and "_stderr" not in metric:
                theirs[f"{task}/{metric}" + ("" if kept == "none" else f",{kept}")] = value
    assert set(ours) == set(theirs) and len(ours) == 7   # acc, acc_norm; 2 exact_match; 3 of KJV
    assert ours == theirs
