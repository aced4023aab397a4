"""Build data/general_text: general English prose for replay and for EWC's Fisher in the SmolLM2 study.

The study needs text that is neither the fine-tuning task (WordNet definitions) nor any probe's
data (capitals, King James Version): quotations, maxims and short prose from the fortune cookie
files of Debian's `fortunes` package (Debian main, BSD-licensed collection). Files with offensive
or code-like entries are not used. Entries are shuffled with a fixed seed; 150 go to test, 150 to validation, the rest to train.

    apt-get download fortunes && dpkg-deb -x fortunes_*.deb /tmp/fortunes
    python scripts/build_general_text.py --fortunes-dir /tmp/fortunes/usr/share/games/fortunes \
        --copyright /tmp/fortunes/usr/share/doc/fortunes/copyright --out data/general_text
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
import re
import shutil

FILES = ("wisdom", "literature", "education", "science", "work", "people")
EVAL_ROWS = 150  # validation and test each: a column of R scored at the start and end of every run


def entries(path: pathlib.Path) -> list[str]:
    """One text per fortune: attribution lines dropped, whitespace joined into one paragraph."""
    texts = []
    for block in path.read_text(encoding="latin-1").split("\n%\n"):
        lines = [ln.strip() for ln in block.strip().splitlines() if not ln.strip().startswith("--")]
        text = re.sub(r"\s+", " ", " ".join(lines)).strip()
        if 40 <= len(text) <= 600 and text.isascii():
            texts.append(text)
    return texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fortunes-dir", type=pathlib.Path, required=True)
    p.add_argument("--copyright", type=pathlib.Path, required=True)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("data/general_text"))
    args = p.parse_args()
    texts = sorted({t for name in FILES for t in entries(args.fortunes_dir / name)})
    random.Random(0).shuffle(texts)
    n = EVAL_ROWS
    splits = {"test": texts[:n], "validation": texts[n:2 * n], "train": texts[2 * n:]}
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(args.out / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in rows)
    shutil.copy(args.copyright, args.out / "LICENSE")
    (args.out / "SOURCE").write_text(
        "Debian package `fortunes` 1:1.99.1-7.3 (bookworm), files " + ", ".join(FILES) + ";\n"
        "built by scripts/build_general_text.py (attributions dropped, 40-600 ASCII characters, "
        "seed-0 shuffle, 150 test, 150 validation, the rest train).\n")
    print({split: len(rows) for split, rows in splits.items()})


if __name__ == "__main__":
    main()
