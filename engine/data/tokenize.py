"""Featurisation: canonical records -> unpadded per-example arrays of the batch contract.

`Featurizer(...)(records)` tokenises a list of records in one batched tokenizer
call and returns one dict of 1-D int32 arrays (or scalars) per record; `packing.collate`
pads them into a batch. Every task kind maps to a record format:

  seq_cls / pair_cls / regression: [CLS] text [SEP] (pair: + text_b [SEP], token_type_ids);
      labels = class id (LabelVocab), or float (regression: text_target's target, or a
      numeric label of text_label / pair).
  token_cls: words -> sub-tokens; the first sub-token of a word carries the tag id, the
      other sub-tokens and the special tokens -100.
  causal_lm (text): labels = input_ids (the loss shifts), EOS appended when the tokenizer has one.
  sft (prompt_completion, chat): the text is prompt + completion as given (no separator is
      added); labels -100 on prompt tokens and non-assistant chat turns; EOS appended to
      completions (when the row has room).
  mlm (text): BERT masking of non-special tokens, from a per-example rng (deterministic).
  embedding (retrieval): query and passages [positive, negatives...] tokenised separately.

Chat records are rendered with the tokenizer's `chat_template` when it has one; the loss
covers each assistant turn = the text the template adds between the prompt of that turn
(`add_generation_prompt=True`) and the conversation up to and including that turn. Without
a template the documented fallback is one line per message, ``"{role}: {content}\\n"``,
with EOS after each assistant content; the loss covers the assistant content (and EOS).
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from tenure.engine.data.batch_spec import IGNORE
from tenure.models.errors import TenureError


class Vocab(Protocol):
    def encode(self, label: Any, location: str) -> int: ...


def resolve_format(task_kind: str, fmt: str | None) -> str:
    """The record format for a task kind (`fmt` or the kind's default), checked."""
    from tenure.engine.tasks.kinds import kind_of
    allowed = kind_of(task_kind).formats
    if fmt is None:
        return allowed[0]
    if fmt not in allowed:
        raise TenureError(f"data.format: {fmt!r} does not fit task {task_kind!r}; use one of {list(allowed)}")
    return fmt


def _i32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


class Featurizer:
    """Tokenises canonical records of one format into per-example contract arrays."""

    def __init__(self, task_kind: str, fmt: str | None, tokenizer, label_vocab: Vocab | None = None, *,
                 max_length: int, mlm_probability: float = 0.15, num_negatives: int = 0):
        from tenure.engine.tasks.kinds import KINDS
        self.task_kind = task_kind
        self.fmt = resolve_format(task_kind, fmt)
        self.kind = KINDS[task_kind]
        self.tok = tokenizer
        self.vocab = label_vocab
        self.max_length = max_length
        self.mlm_probability = mlm_probability
        self.num_negatives = num_negatives
        self.eos_id = tokenizer.eos_token_id
        if self.kind.labelled and label_vocab is None:
            raise TenureError(f"task {task_kind!r} needs a label vocabulary")
        problem = self.kind.check_tokenizer(tokenizer)
        if problem:
            raise TenureError(problem)
        pair = self.fmt == "pair"
        specials = tokenizer.num_special_tokens_to_add(pair=pair)
        if max_length is not None and max_length <= specials + pair:  # every example would be special tokens only
            raise TenureError(f"config key 'data.max_length': {max_length} leaves no room for text beside the "
                              f"tokenizer's {specials} special tokens{' of a pair' if pair else ''}")

    def __call__(self, records: Sequence[dict],
                 rngs: Sequence[np.random.Generator] | None = None) -> list[dict[str, np.ndarray]]:
        """Features of each record (the kind picks the method below); `rngs` (one per record)
        drive MLM masking only.

        Label errors name the record's `location` key (set by records.parse_record)."""
        if not records:
            return []
        locations = [r.get("location", f"record {i}") for i, r in enumerate(records)]
        return self.kind.features(self, records, locations, rngs)

    def lengths(self, records: Sequence[dict]) -> list[int]:
        """Untruncated token length of each record (for retrieval: the longest of its texts)."""
        saved, self.max_length = self.max_length, 1 << 30
        try:
            feats = self(records, [np.random.default_rng(0)] * len(records))
        finally:
            self.max_length = saved
        key = "query_input_ids" if self.fmt == "retrieval" else "input_ids"
        return [max(f[key].shape[-1], f.get("passage_input_ids", f[key]).shape[-1]) for f in feats]

    # -- classification and regression -------------------------------------------------
    def classify(self, records, locations):
        if self.fmt == "pair":
            enc = self.tok([r["text_a"] for r in records], [r["text_b"] for r in records],
                           truncation=True, max_length=self.max_length, return_token_type_ids=True)
        else:
            enc = self.tok([r["text"] for r in records], truncation=True, max_length=self.max_length)
        label_key = "target" if self.fmt == "text_target" else "label"
        out = []
        for i, (rec, loc) in enumerate(zip(records, locations)):
            ex = {"input_ids": _i32(enc["input_ids"][i]), "attention_mask": _i32(enc["attention_mask"][i])}
            if self.fmt == "pair":
                ex["token_type_ids"] = _i32(enc["token_type_ids"][i])
            ex["labels"] = self._label(rec[label_key], loc, label_key)
            out.append(ex)
        return out

    def _label(self, value, location: str, field: str) -> np.ndarray:
        if not self.kind.numeric_labels:
            return np.asarray(self.vocab.encode(value, location), dtype=np.int32)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TenureError(f"{location}: field {field!r}: expected a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise TenureError(f"{location}: field {field!r}: expected a number, got {value!r}") from None
        if not np.isfinite(number):
            raise TenureError(f"{location}: field {field!r}: expected a finite number, got {value!r}")
        return np.asarray(number, dtype=np.float32)

    # -- token classification -----------------------------------------------------------
    def token_tags(self, records, locations):
        enc = self.tok([list(r["tokens"]) for r in records], is_split_into_words=True,
                       truncation=True, max_length=self.max_length)
        out = []
        for i, (rec, loc) in enumerate(zip(records, locations)):
            tag_ids = [self.vocab.encode(t, loc) for t in rec["tags"]]
            labels, previous = [], None
            for word in enc.word_ids(i):
                labels.append(IGNORE if word is None or word == previous else tag_ids[word])
                previous = word
            out.append({"input_ids": _i32(enc["input_ids"][i]),
                        "attention_mask": _i32(enc["attention_mask"][i]), "labels": _i32(labels)})
        return out

    # -- language modelling ---------------------------------------------------------------
    def _with_eos(self, ids: list[int], limit: int) -> list[int]:
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids = ids + [self.eos_id]
        return ids[:limit]

    def text(self, records):
        enc = self.tok([r["text"] for r in records], truncation=True, max_length=self.max_length)
        out = []
        for ids in enc["input_ids"]:
            ids_L = _i32(self._with_eos(list(ids), self.max_length))
            out.append({"input_ids": ids_L, "attention_mask": np.ones_like(ids_L), "labels": ids_L.copy()})
        return out

    def masked_text(self, records, rngs):
        enc = self.tok([r["text"] for r in records], truncation=True, max_length=self.max_length)
        out = []
        for ids, rng in zip(enc["input_ids"], rngs):
            ids_L, labels_L = self._mask(list(ids), rng)
            out.append({"input_ids": ids_L, "attention_mask": np.ones_like(ids_L), "labels": labels_L})
        return out

    def _mask(self, ids: list[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """BERT masking: select non-special tokens with p; of those 80% [MASK], 10% random, 10% kept."""
        ids_L = _i32(ids)
        special = np.asarray(self.tok.get_special_tokens_mask(ids, already_has_special_tokens=True), bool)
        u_select, u_action = rng.random(len(ids)), rng.random(len(ids))
        random_ids = rng.integers(0, len(self.tok), len(ids))
        selected = (u_select < self.mlm_probability) & ~special
        labels_L = np.where(selected, ids_L, IGNORE).astype(np.int32)
        ids_L = np.where(selected & (u_action < 0.8), self.tok.mask_token_id, ids_L)
        ids_L = np.where(selected & (u_action >= 0.8) & (u_action < 0.9), random_ids, ids_L)
        return ids_L.astype(np.int32), labels_L

    def prompt_completion(self, records):
        pairs = [(r["prompt"], r["completion"]) for r in records]
        texts = [p + c for p, c in pairs]
        spans = [[(len(p), len(p) + len(c))] for p, c in pairs]
        return self._spans_to_examples(texts, spans, add_special_tokens=True, eos_after_spans=True)

    def chat(self, records):
        texts, spans = zip(*(self._render_chat(r["messages"]) for r in records))
        has_template = bool(getattr(self.tok, "chat_template", None))
        return self._spans_to_examples(list(texts), list(spans), add_special_tokens=not has_template,
                                       eos_after_spans=False)

    def _render_chat(self, messages) -> tuple[str, list[tuple[int, int]]]:
        if not getattr(self.tok, "chat_template", None):
            text, spans = "", []
            eos = self.tok.eos_token or ""
            for m in messages:
                text += f"{m['role']}: "
                start = len(text)
                text += m["content"] + (eos if m["role"] == "assistant" else "")
                if m["role"] == "assistant":
                    spans.append((start, len(text)))
                text += "\n"
            return text, spans
        def render(msgs, generation_prompt: bool) -> str:
            try:
                return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
            except ImportError:
                raise TenureError("data: the tokenizer's chat template needs the jinja2 package "
                                  "(pip install jinja2)") from None

        text = render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, through = render(messages[:i], True), render(messages[: i + 1], False)
            if not (through.startswith(before) and text.startswith(through)):
                raise TenureError("data: the tokenizer's chat template is not prefix-stable, "
                                  "so assistant turns cannot be located for the loss mask")
            spans.append((len(before), len(through)))
        return text, spans

    def _spans_to_examples(self, texts, spans, *, add_special_tokens: bool, eos_after_spans: bool):
        """Tokenise texts; labels = ids on tokens starting inside a loss span, else -100."""
        enc = self.tok(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                       truncation=True, max_length=self.max_length)
        out = []
        for i, text_spans in enumerate(spans):
            ids = list(enc["input_ids"][i])
            in_span = [end > start and any(a <= start < b for a, b in text_spans)
                       for start, end in enc["offset_mapping"][i]]
            labels = [t if keep else IGNORE for t, keep in zip(ids, in_span)]
            if eos_after_spans and self.eos_id is not None and len(ids) < self.max_length:
                ids, labels = ids + [self.eos_id], labels + [self.eos_id]
            ids_L = _i32(ids)
            out.append({"input_ids": ids_L, "attention_mask": np.ones_like(ids_L), "labels": _i32(labels)})
        return out

    # -- retrieval ------------------------------------------------------------------------
    def retrieval(self, records):
        n_pass = 1 + self.num_negatives
        queries = self.tok([r["query"] for r in records], truncation=True, max_length=self.max_length)
        passages = []
        for r in records:
            negatives = list(r.get("negatives") or [])[: self.num_negatives]
            passages += [r["positive"]] + negatives
        enc = self.tok(passages, truncation=True, max_length=self.max_length)
        out = []
        for i in range(len(records)):
            rows = enc["input_ids"][i * n_pass:(i + 1) * n_pass]
            width = max(len(row) for row in rows)
            ids_PxL = np.zeros((n_pass, width), np.int32)
            mask_PxL = np.zeros((n_pass, width), np.int32)
            for p, row in enumerate(rows):
                ids_PxL[p, : len(row)], mask_PxL[p, : len(row)] = row, 1
            q = _i32(queries["input_ids"][i])
            out.append({"query_input_ids": q, "query_attention_mask": np.ones_like(q),
                        "passage_input_ids": ids_PxL, "passage_attention_mask": mask_PxL})
        return out
