"""Build the general-ability probe data under data/probes/ (lm-eval tasks, see data/probes/*.yaml).

    pip install countryinfo            # MIT; only needed to rebuild, not at run time
    apt-get install -y bible-kjv       # Debian's KJV text (public domain) and its `bible` reader
    python scripts/build_probe_data.py

Writes, each with the licence of its source beside it:
  capitals/  test.jsonl (country, capital, 4 choices from the same region, label) and
             train.jsonl (the few-shot examples, countries not in test), from `countryinfo`
  kjv/       test.jsonl: short passages (the first verses of evenly spaced chapters) for rolling
             log-likelihood, from `bible -f` (the bible-kjv-text data)
  format/    test.jsonl: a short output-format instruction applied to a word (capital letters,
             double quotes, the word twice), two worked examples in each prompt; words from KJV
             verses the kjv probe does not use
Deterministic: the same packages give the same files.
"""
from __future__ import annotations

import collections
import importlib.metadata
import json
import random
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "probes"
SEED = 0
CAPITALS = 150                       # test countries, by population
FEW_SHOT_COUNTRIES = ("France", "Japan", "Kenya")
KJV_PASSAGES = 120
KJV_MIN_WORDS = 25                   # a passage is the first verses of a chapter up to this many words
FORMAT_ITEMS_PER_RULE = 50
FORMAT_RULES = {                     # instruction -> how the output is made from the word
    "Write the word in capital letters.": lambda w: w.upper(),
    "Write the word in double quotes.": lambda w: f'"{w}"',
    "Write the word twice, separated by a comma.": lambda w: f"{w}, {w}",
}
VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def package_licence(distribution: str) -> Path:
    files = importlib.metadata.distribution(distribution).files or []
    for f in files:
        if Path(str(f)).name.upper().startswith("LICENSE"):
            return Path(f.locate())
    raise SystemExit(f"{distribution}: no LICENSE file in its installed metadata")


def build_capitals() -> None:
    import countryinfo
    rows = []
    for country in countryinfo.all_countries():
        try:
            name, capital, population, region = country.name(), country.capital(), country.population(), country.region()
        except Exception:  # noqa: BLE001  entries without a capital or population (Antarctica, ...) are skipped
            continue
        if not (name and isinstance(capital, str) and capital and population and region):
            continue  # no capital, or several (South Africa): no single answer
        if capital.lower() in name.lower() or name.lower() in capital.lower():
            continue  # "Kuwait City", "Singapore": the country gives the answer away
        rows.append({"country": name, "capital": capital, "population": int(population), "region": region})
    rows.sort(key=lambda r: (-r["population"], r["country"]))
    by_region = collections.defaultdict(list)
    for r in rows:
        by_region[r["region"]].append(r["capital"])
    rng = random.Random(SEED)
    shots = [r for r in rows if r["country"] in FEW_SHOT_COUNTRIES]
    test = [r for r in rows if r["country"] not in FEW_SHOT_COUNTRIES][:CAPITALS]
    out = []
    for r in test:
        same_region = sorted(set(by_region[r["region"]]) - {r["capital"]})
        pool = same_region if len(same_region) >= 3 else sorted({x["capital"] for x in rows} - {r["capital"]})
        choices = rng.sample(pool, 3) + [r["capital"]]
        rng.shuffle(choices)
        out.append({"country": r["country"], "capital": r["capital"], "choices": choices,
                    "label": choices.index(r["capital"])})
    write_jsonl(OUT / "capitals" / "test.jsonl", out)
    write_jsonl(OUT / "capitals" / "train.jsonl",
                [{"country": r["country"], "capital": r["capital"], "choices": [r["capital"]], "label": 0}
                 for r in shots])
    shutil.copyfile(package_licence("countryinfo"), OUT / "capitals" / "LICENSE")
    version = importlib.metadata.version("countryinfo")
    (OUT / "capitals" / "SOURCE").write_text(
        f"Countries and capitals from the PyPI package countryinfo {version} (MIT, LICENSE beside this file),\n"
        f"built by scripts/build_probe_data.py: the {CAPITALS} most populous countries whose name does not\n"
        "contain the capital's (or the reverse); distractors are capitals of the same region.\n")


def kjv_verses() -> list[tuple[str, int, int, str]]:
    text = subprocess.run(["bible", "-f", "-l100000", "Gen1:1-Rev22:21"], check=True, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL).stdout
    verses = []
    for line in text.splitlines():
        match = VERSE.match(line)
        if match:
            verses.append((match[1], int(match[2]), int(match[3]), match[4].strip()))
    if len(verses) != 31102:
        raise SystemExit(f"bible: expected the 31,102 verses of the KJV, read {len(verses)}")
    return verses


def build_kjv(verses) -> set[tuple[str, int]]:
    chapters = collections.OrderedDict()
    for book, chapter, _, text in verses:
        chapters.setdefault((book, chapter), []).append(text)
    keys = list(chapters)
    step = len(keys) / KJV_PASSAGES
    picked = [keys[int(i * step)] for i in range(KJV_PASSAGES)]
    rows = []
    for book, chapter in picked:
        words = []
        for verse in chapters[(book, chapter)]:
            words += verse.split()
            if len(words) >= KJV_MIN_WORDS:
                break
        rows.append({"reference": f"{book} {chapter}", "text": " ".join(words)})
    write_jsonl(OUT / "kjv" / "test.jsonl", rows)
    shutil.copyfile("/usr/share/doc/bible-kjv-text/copyright", OUT / "kjv" / "LICENSE")
    (OUT / "kjv" / "SOURCE").write_text(
        "King James Version text (public domain; Debian's copyright file beside this as LICENSE) from the\n"
        f"Debian package bible-kjv-text, read with `bible -f`. {KJV_PASSAGES} passages: the first verses of evenly\n"
        f"spaced chapters, at least {KJV_MIN_WORDS} words each. Built by scripts/build_probe_data.py.\n")
    return set(picked)


def build_format(verses, used_chapters: set) -> None:
    counts = collections.Counter(
        word for book, chapter, _, text in verses if (book, chapter) not in used_chapters
        for word in re.findall(r"\b[a-z]+\b", text) if 5 <= len(word) <= 8)
    common = sorted(w for w, n in counts.items() if n >= 20)
    rng = random.Random(SEED)
    words = rng.sample(common, FORMAT_ITEMS_PER_RULE * len(FORMAT_RULES) + 2 * len(FORMAT_RULES))
    rows = []
    for r, (instruction, rule) in enumerate(FORMAT_RULES.items()):
        shots, items = words[2 * r:2 * r + 2], words[2 * len(FORMAT_RULES) + r * FORMAT_ITEMS_PER_RULE:][
            :FORMAT_ITEMS_PER_RULE]
        examples = "".join(f"Instruction: {instruction}\nWord: {w}\nAnswer: {rule(w)}\n\n" for w in shots)
        for word in items:
            rows.append({"instruction": instruction, "word": word,
                         "prompt": f"{examples}Instruction: {instruction}\nWord: {word}\nAnswer:",
                         "answer": rule(word)})
    write_jsonl(OUT / "format" / "test.jsonl", rows)
    shutil.copyfile("/usr/share/doc/bible-kjv-text/copyright", OUT / "format" / "LICENSE")
    (OUT / "format" / "SOURCE").write_text(
        "Output-format instructions applied to common words (5-8 letters, 20+ occurrences) of the King James\n"
        "Version (public domain, Debian bible-kjv-text; LICENSE beside this), outside the chapters of the kjv\n"
        f"probe. {FORMAT_ITEMS_PER_RULE} words per instruction; the two worked examples in each prompt use other words.\n"
        "Built by scripts/build_probe_data.py.\n")


def main() -> None:
    build_capitals()
    verses = kjv_verses()
    build_format(verses, build_kjv(verses))
    for path in sorted(OUT.glob("*/test.jsonl")):
        print(f"{path.relative_to(ROOT)}: {sum(1 for _ in path.open())} items")


if __name__ == "__main__":
    main()
