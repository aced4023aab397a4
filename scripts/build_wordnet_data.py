"""Build the small bundled datasets in data/ from WordNet 3.0 (no nltk; parses the files itself).

    apt-get install -y wordnet-base
    python scripts/build_wordnet_data.py --wordnet-dir /usr/share/wordnet --out data

Deterministic: every dataset draws from its own ``random.Random(seed + k)`` over synsets
sorted by (part of speech, offset). Each dataset folder gets train/validation/test JSONL,
a README.md with sizes and label counts, and the WordNet licence as LICENSE.
"""
import argparse
import collections
import json
import random
import re
import shutil
from pathlib import Path

COMMAND = "python scripts/build_wordnet_data.py --wordnet-dir /usr/share/wordnet --out data"
COPYRIGHT = Path("/usr/share/doc/wordnet-base/copyright")
ROOT_NOUN = ("n", 1740)  # entity.n.01

# lexnames(5WN): lexicographer file numbers 00-44, in order.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()

Synset = collections.namedtuple("Synset", "key lexname lemmas hypernyms hyponyms gloss definition")


# --- parsing ------------------------------------------------------------------------


def definition_of(gloss: str) -> str:
    """The definition part of a gloss: the text before the first quoted example."""
    return gloss.split('"', 1)[0].strip().rstrip(";").strip()


def parse_data_file(path: Path, pos: str) -> list[Synset]:
    """One synset per data line (wndb(5WN)): offset lex_filenum ss_type w_cnt words p_cnt pointers | gloss."""
    synsets = []
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):  # licence header
            continue
        head, gloss = line.split(" | ", 1)
        fields = head.split()
        offset, lex_filenum, word_count = int(fields[0]), int(fields[1]), int(fields[3], 16)
        lemmas = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in fields[4 : 4 + 2 * word_count : 2]]
        at = 4 + 2 * word_count
        pointer_count = int(fields[at])
        hypernyms, hyponyms = [], []
        for i in range(pointer_count):
            symbol, target, target_pos = fields[at + 1 + 4 * i : at + 4 + 4 * i]
            target_key = ("n" if target_pos == "n" else target_pos, int(target))
            if symbol in ("@", "@i"):
                hypernyms.append(target_key)
            elif symbol in ("~", "~i"):
                hyponyms.append(target_key)
        gloss = gloss.strip()
        synsets.append(
            Synset((pos, offset), LEXNAMES[lex_filenum], lemmas, hypernyms, hyponyms, gloss,
                   definition_of(gloss))
        )
    return synsets


def load_wordnet(wordnet_dir: Path) -> dict:
    synsets = {}
    for pos, name in (("n", "noun"), ("v", "verb"), ("a", "adj"), ("r", "adv")):
        path = wordnet_dir / f"data.{name}"
        if not path.is_file():
            raise SystemExit(f"{path}: missing; install Debian's wordnet-base or pass --wordnet-dir")
        for synset in parse_data_file(path, pos):
            synsets[synset.key] = synset
    return dict(sorted(synsets.items()))


def sense_counts(synsets: dict) -> collections.Counter:
    """How many synsets of the same part of speech each (pos, lemma) appears in."""
    return collections.Counter((s.key[0], lemma.lower()) for s in synsets.values() for lemma in s.lemmas)


def monosemous_lemma(synset: Synset, senses: collections.Counter) -> str | None:
    for lemma in synset.lemmas:
        if senses[(synset.key[0], lemma.lower())] == 1:
            return lemma
    return None


def breadth_first(synsets: dict, start, edges: str) -> dict:
    """Fewest ``edges`` steps ('hypernyms' or 'hyponyms') from ``start`` to every synset reached."""
    distance, frontier = {start: 0}, [start]
    while frontier:
        nxt = []
        for node in frontier:
            for neighbour in getattr(synsets[node], edges):
                if neighbour not in distance:
                    distance[neighbour] = distance[node] + 1
                    nxt.append(neighbour)
        frontier = nxt
    return distance


def wu_palmer(synsets: dict, a, b, depth: dict) -> float:
    """max over common ancestors c of 2 d(c) / (2 d(c) + dist(c, a) + dist(c, b)), d(root) = 1."""
    up_a, up_b = breadth_first(synsets, a, "hypernyms"), breadth_first(synsets, b, "hypernyms")
    common = set(up_a) & set(up_b)
    return max(2 * depth[c] / (2 * depth[c] + up_a[c] + up_b[c]) for c in common)


# --- splitting and writing ----------------------------------------------------------


def split_records(records: list, sizes: tuple[int, int, int], key) -> dict:
    """Drop records whose ``key`` repeats, then cut (already shuffled) records into three splits."""
    seen, unique = set(), []
    for record in records:
        if key(record) not in seen:
            seen.add(key(record))
            unique.append(record)
    needed = sum(sizes)
    if len(unique) < needed:
        raise SystemExit(f"only {len(unique)} unique records, need {needed}")
    train, val = sizes[0], sizes[0] + sizes[1]
    return {"train": unique[:train], "validation": unique[train:val], "test": unique[val:needed]}


def value_summary(splits: dict) -> list[str]:
    """README lines describing BIO tag counts or regression targets, when the records have them."""
    train = splits["train"]
    if "tags" in train[0]:
        counts = collections.Counter(tag for r in train for tag in r["tags"])
        return ["", "Train tag counts: " + ", ".join(f"{t} {n}" for t, n in sorted(counts.items())) + "."]
    if "target" in train[0]:
        targets = sorted(r["target"] for r in train)
        quantiles = [targets[int(q * (len(targets) - 1))] for q in (0, 0.25, 0.5, 0.75, 1)]
        mean = sum(targets) / len(targets)
        spread = " / ".join(map(str, quantiles))
        return ["", f"Train targets: mean {mean:.3f}; min/25%/median/75%/max {spread}."]
    return []


def write_dataset(out: Path, name: str, splits: dict, about: str, fields: str, label_field=None) -> dict:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    shutil.copyfile(COPYRIGHT, folder / "LICENSE")
    sizes = {split: len(records) for split, records in splits.items()}
    lines = [
        f"# {name}",
        "",
        about,
        "",
        "Source: WordNet 3.0 (Princeton University), from Debian's `wordnet-base` package "
        "(`/usr/share/wordnet/data.*`). Licence: the WordNet 3.0 licence, which permits use, "
        "copying, modification and redistribution with its notice; see `LICENSE` (verbatim copy "
        "of `/usr/share/doc/wordnet-base/copyright`). WordNet 3.0 Copyright 2006 by Princeton "
        "University. All rights reserved.",
        "",
        f"Built with: `{COMMAND}`",
        "",
        f"Fields: {fields}",
        "",
        "| split | examples |",
        "|---|---|",
        *[f"| {split} | {n} |" for split, n in sizes.items()],
    ]
    lines += value_summary(splits)
    majority = None
    if label_field:
        train_counts = collections.Counter(r[label_field] for r in splits["train"])
        majority = max(train_counts.values()) / sizes["train"]
        test_counts = collections.Counter(r[label_field] for r in splits["test"])
        lines += ["", f"Label distribution ({len(train_counts)} classes):", "",
                  "| label | train | test |", "|---|---|---|"]
        lines += [f"| {label} | {n} | {test_counts[label]} |" for label, n in sorted(train_counts.items())]
        lines += ["", f"Majority-class baseline (train majority share): {majority:.1%}."]
    (folder / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"name": name, "sizes": sizes, "majority": majority}


# --- the datasets -------------------------------------------------------------------

LEXNAME_CLASSES = (
    "noun.artifact noun.person noun.plant noun.animal noun.act noun.communication noun.state "
    "noun.location noun.attribute noun.substance noun.cognition noun.group noun.food noun.body "
    "noun.object noun.quantity"
).split()


def build_lexnames(synsets, rng, per_class=(500, 64, 100)) -> dict:
    by_class = collections.defaultdict(list)
    seen = set()
    for s in synsets.values():
        if s.lexname in LEXNAME_CLASSES and s.definition and s.definition not in seen:
            seen.add(s.definition)
            by_class[s.lexname].append({"text": s.definition, "label": s.lexname})
    splits = {"train": [], "validation": [], "test": []}
    for lexname in LEXNAME_CLASSES:
        pool = rng.sample(by_class[lexname], sum(per_class))
        splits["train"] += pool[: per_class[0]]
        splits["validation"] += pool[per_class[0] : per_class[0] + per_class[1]]
        splits["test"] += pool[per_class[0] + per_class[1] :]
    for records in splits.values():
        rng.shuffle(records)
    return splits


def build_pairs(synsets, rng, sizes=(3000, 500, 500)) -> dict:
    """Gloss vs. the gloss of its direct hypernym, or of an unrelated noun in the same category."""
    nouns = [s for s in synsets.values() if s.key[0] == "n" and s.hypernyms and s.definition]
    by_lexname = collections.defaultdict(list)
    for s in nouns:
        by_lexname[s.lexname].append(s)
    rng.shuffle(nouns)
    records = []
    for i, s in enumerate(nouns[: 2 * sum(sizes)]):
        related = set(breadth_first(synsets, s.key, "hypernyms")) | set(s.hyponyms)
        if i % 2 == 0:
            other, label = synsets[rng.choice(s.hypernyms)], "hypernym"
        else:
            other = rng.choice(by_lexname[s.lexname])
            while other.key in related:
                other = rng.choice(by_lexname[s.lexname])
            label = "unrelated"
        if other.definition and other.definition != s.definition:
            records.append({"text_a": s.definition, "text_b": other.definition, "label": label})
    return split_records(records, sizes, key=lambda r: r["text_a"])


NER_TEMPLATES = [
    "{PER} moved to {LOC} in the spring .",
    "Yesterday {PER} cooked {FOOD} for the whole family .",
    "A {ANIMAL} was spotted near {LOC} last week .",
    "{PER} said that the {ANIMAL} ate all the {FOOD} .",
    "We drove from {LOC} to {LOC} without stopping .",
    "The museum in {LOC} has a portrait of {PER} .",
    "My neighbour keeps a {ANIMAL} in the garden .",
    "Have you ever tried {FOOD} with {FOOD} ?",
    "{PER} and {PER} first met in {LOC} .",
    "The documentary about the {ANIMAL} was narrated by {PER} .",
    "Tourists in {LOC} often order {FOOD} .",
    "Nobody expected {PER} to win the prize .",
    "There is a statue of a {ANIMAL} in the centre of {LOC} .",
    "She wrote a long book about {PER} .",
    "The menu listed {FOOD} , {FOOD} and {FOOD} .",
    "Scientists tracked the {ANIMAL} across {LOC} .",
    "I read an article about {ANY} this morning .",
    "Everyone at the party was talking about {ANY} .",
    "The report mentioned {ANY} twice .",
    "{PER} photographed the {ANIMAL} at dawn .",
    "After the concert in {LOC} we had {FOOD} .",
    "According to {PER} , {LOC} is beautiful in autumn .",
    "The children fed the {ANIMAL} some {FOOD} .",
    "A letter from {PER} arrived from {LOC} .",
]
NER_TYPES = {"PER": "noun.person", "LOC": "noun.location", "FOOD": "noun.food", "ANIMAL": "noun.animal"}


def ner_lemma_pools(synsets, rng) -> dict:
    """Lemmas per entity type, cut into disjoint train/validation/test pools (unseen test entities).

    PER and LOC use capitalised lemmas (names such as 'Marie Curie', 'New Orleans');
    FOOD and ANIMAL use lower-case common nouns ('apple pie', 'golden retriever').
    """
    pools = {}
    for tag, lexname in NER_TYPES.items():
        proper = tag in ("PER", "LOC")
        lemmas = sorted({
            lemma for s in synsets.values() if s.key[0] == "n" and s.lexname == lexname for lemma in s.lemmas
            if re.fullmatch(r"[A-Za-z][A-Za-z' .-]*", lemma) and len(lemma.split()) <= 4
            and lemma[0].isupper() == proper and (proper or lemma.islower())
        })
        rng.shuffle(lemmas)
        cut1, cut2 = int(0.8 * len(lemmas)), int(0.9 * len(lemmas))
        pools[tag] = {"train": lemmas[:cut1], "validation": lemmas[cut1:cut2], "test": lemmas[cut2:]}
    return pools


def ner_sentence(template: str, pools: dict, split: str, rng) -> dict:
    tokens, tags = [], []
    for piece in template.split():
        slot = re.fullmatch(r"\{(\w+)\}", piece)
        if not slot:
            tokens.append(piece)
            tags.append("O")
            continue
        tag = slot.group(1) if slot.group(1) != "ANY" else rng.choice(sorted(NER_TYPES))
        words = rng.choice(pools[tag][split]).split()
        tokens += words
        tags += [f"B-{tag}"] + [f"I-{tag}"] * (len(words) - 1)
    return {"tokens": tokens, "tags": tags}


def build_ner(synsets, rng, sizes=(2000, 300, 300)) -> dict:
    pools = ner_lemma_pools(synsets, rng)
    splits = {}
    for split, size in zip(("train", "validation", "test"), sizes):
        seen, records = set(), []
        while len(records) < size:
            record = ner_sentence(rng.choice(NER_TEMPLATES), pools, split, rng)
            if " ".join(record["tokens"]) not in seen:
                seen.add(" ".join(record["tokens"]))
                records.append(record)
        splits[split] = records
    return splits


def build_regression(synsets, rng, sizes=(3000, 500, 500)) -> dict:
    """Two noun definitions and their Wu-Palmer similarity; pairs: close / same category / random."""
    depth = {k: d + 1 for k, d in breadth_first(synsets, ROOT_NOUN, "hyponyms").items()}
    nouns = [synsets[k] for k in depth if synsets[k].definition and k != ROOT_NOUN]
    by_lexname = collections.defaultdict(list)
    for s in nouns:
        by_lexname[s.lexname].append(s)
    records = []
    for i in range(int(1.1 * sum(sizes))):
        a = rng.choice(nouns)
        if i % 3 == 0 and a.hypernyms:  # a sibling or cousin: climb 1-2 levels, come down again
            node = synsets[rng.choice(a.hypernyms)]
            if rng.random() < 0.5 and node.hypernyms:
                node = synsets[rng.choice(node.hypernyms)]
            for _ in range(2):
                if node.hyponyms:
                    node = synsets[rng.choice(node.hyponyms)]
            b = node
        elif i % 3 == 1:
            b = rng.choice(by_lexname[a.lexname])
        else:
            b = rng.choice(nouns)
        if a.key == b.key or b.key not in depth or not b.definition:
            continue
        target = round(wu_palmer(synsets, a.key, b.key, depth), 4)
        records.append({"text_a": a.definition, "text_b": b.definition, "target": target})
    return split_records(records, sizes, key=lambda r: (r["text_a"], r["text_b"]))


def build_sft(synsets, rng, sizes=(3000, 200, 200)) -> dict:
    """'Define: <lemma>' -> the definition, for lemmas with one sense and definitions of <= 20 words."""
    senses = sense_counts(synsets)
    records = []
    for s in synsets.values():
        lemma = monosemous_lemma(s, senses)
        if lemma and s.definition and len(s.definition.split()) <= 20:
            records.append({"prompt": f"Define: {lemma}\n", "completion": s.definition})
    rng.shuffle(records)
    return split_records(records, sizes, key=lambda r: r["prompt"].lower())


def build_text(synsets, rng, sizes=(5000, 500, 500)) -> dict:
    records = [{"text": s.gloss} for s in synsets.values() if s.definition]
    rng.shuffle(records)
    return split_records(records, sizes, key=lambda r: r["text"])


def build_retrieval(synsets, rng, sizes=(3000, 300, 300), negatives=3) -> dict:
    """Query: a one-sense noun lemma; positive: its definition; negatives: 3 sibling definitions."""
    senses = sense_counts(synsets)
    records = []
    for s in synsets.values():
        lemma = monosemous_lemma(s, senses)
        if s.key[0] != "n" or not lemma or not s.definition or not s.hypernyms:
            continue
        siblings = sorted({
            synsets[c].definition for h in s.hypernyms for c in synsets[h].hyponyms
            if c != s.key and synsets[c].definition and synsets[c].definition != s.definition
        })
        if len(siblings) >= negatives:
            hard = rng.sample(siblings, negatives)
            records.append({"query": lemma, "positive": s.definition, "negatives": hard})
    rng.shuffle(records)
    return split_records(records, sizes, key=lambda r: r["query"].lower())


DATASETS = [
    ("wordnet_lexnames", "sequence classification (quickstart), 16 classes", build_lexnames, "label",
     "Quickstart sequence classification: the definition of a noun synset (no examples, no lemma) "
     "labelled with its WordNet lexicographer category, 16 balanced classes. With the all-MiniLM-L6-v2 "
     "tokenizer the texts average 16 tokens (95th percentile 32; 7 of 8000 exceed 64). A TF-IDF "
     "(1-2 grams) + logistic regression reference (scikit-learn, C=10) scores 72.9% test accuracy.",
     "`text` (definition), `label` (lexname, e.g. `noun.animal`)"),
    ("wordnet_pairs", "sentence-pair classification, 2 classes", build_pairs, "label",
     "Sentence-pair classification. text_a is a noun definition; text_b is the definition of its direct "
     "hypernym (`hypernym`) or of a random noun of the same category that is neither an ancestor nor a "
     "direct hyponym (`unrelated`), alternating 50/50.",
     "`text_a`, `text_b`, `label` (`hypernym` | `unrelated`)"),
    ("wordnet_ner", "token labelling, BIO, 4 types (generated)", build_ner, None,
     "Token labelling (BIO). GENERATED: sentences are 24 hand-written templates whose slots are filled with "
     "WordNet lemmas: PER (capitalised noun.person lemmas), LOC (capitalised noun.location lemmas), FOOD "
     "(lower-case noun.food lemmas), ANIMAL (lower-case noun.animal lemmas); multi-word lemmas give B-/I- "
     "spans. Lemma pools are disjoint between splits, so test entities are unseen in training.",
     "`tokens` (list of words), `tags` (BIO tags: O, B-/I- PER, LOC, FOOD, ANIMAL)"),
    ("wordnet_regression", "sentence-pair regression (Wu-Palmer)", build_regression, None,
     "Sentence-pair regression. Two noun definitions and the Wu-Palmer similarity of their synsets, "
     "2*d(c) / (2*d(c) + dist(c,a) + dist(c,b)) maximised over common hypernym ancestors c, with d the "
     "shortest depth below entity.n.01 (root = 1); pairs are one third each: close relatives (siblings or "
     "cousins), same category, random.",
     "`text_a`, `text_b`, `target` (float in (0, 1))"),
    ("wordnet_sft", "prompt/completion SFT", build_sft, None,
     "Prompt/completion SFT: `Define: <lemma>` followed by a newline, completion the definition. Lemmas with "
     "exactly one sense in their part of speech (all four parts of speech), definitions of at most 20 words.",
     "`prompt`, `completion`"),
    ("wordnet_text", "causal / masked LM text", build_text, None,
     "Plain text for causal or masked LM: full WordNet glosses (definition plus quoted examples), all parts "
     "of speech.",
     "`text`"),
    ("wordnet_retrieval", "retrieval, 3 hard negatives", build_retrieval, None,
     "Retrieval / contrastive embedding. The query is a noun lemma with one noun sense; the positive is its "
     "definition; the 3 hard negatives are definitions of sibling synsets (other hyponyms of its hypernyms).",
     "`query`, `positive`, `negatives` (list of 3 definitions)"),
]


def write_index(out: Path, summaries: list[dict]) -> None:
    lines = [
        "# Bundled datasets",
        "",
        "Small real-text datasets built from WordNet 3.0 (Princeton University; WordNet 3.0 licence, "
        "redistribution permitted with the notice, see each folder's `LICENSE`). Rebuild all of them with:",
        "",
        f"    apt-get install -y wordnet-base && {COMMAND}",
        "",
        "| folder | task | train | validation | test | majority baseline |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        majority = f"{s['majority']:.1%}" if s["majority"] is not None else "-"
        sizes = s["sizes"]
        lines.append(f"| `{s['name']}/` | {s['task']} | {sizes['train']} | {sizes['validation']} | "
                     f"{sizes['test']} | {majority} |")
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not COPYRIGHT.is_file():
        raise SystemExit(f"{COPYRIGHT}: missing; install Debian's wordnet-base")
    synsets = load_wordnet(args.wordnet_dir)
    summaries = []
    for k, (name, task, build, label_field, about, fields) in enumerate(DATASETS):
        splits = build(synsets, random.Random(args.seed + k))
        summaries.append({"task": task, **write_dataset(args.out, name, splits, about, fields, label_field)})
        print(name, {split: len(r) for split, r in splits.items()})
    write_index(args.out, summaries)


if __name__ == "__main__":
    main()
