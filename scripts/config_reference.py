"""Prints the config reference (every key, type, default, description) as Markdown tables.

    .venv/bin/python scripts/config_reference.py > /tmp/ref.md   # pasted into README.md
"""
from __future__ import annotations

import os
import sys
import typing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pydantic import BaseModel  # noqa: E402

from engine.config import Config  # noqa: E402


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return text or (str(annotation).replace("typing.", "").replace("NoneType", "None")
                    .replace("engine.data.config.", ""))


def _submodel(annotation) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def rows(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _submodel(field.annotation)
        if sub is not None and not typing.get_args(field.annotation)[1:2] == (dict,):
            yield from rows(sub, f"{key}.")
            continue
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        yield key, _type_name(field.annotation), default, (field.description or "").replace("|", "\\|")


def main() -> None:
    section = None
    for key, kind, default, description in rows(Config):
        top = key.split(".")[0]
        if top != section:
            section = top
            print(f"\n**{section}**\n\n| key | type | default | meaning |\n|---|---|---|---|")
        print(f"| `{key}` | `{kind}` | `{default}` | {description} |")


if __name__ == "__main__":
    main()
