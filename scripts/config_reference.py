"""Prints the config reference (every key, type, default, description) as Markdown tables.

    .venv/bin/python scripts/config_reference.py > /tmp/ref.md   # pasted into README.md
"""
from __future__ import annotations

import os
import sys
import typing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pydantic import BaseModel  # noqa: E402

from tenure.engine.config.schema import Config  # noqa: E402


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return text or (str(annotation).replace("typing.", "").replace("NoneType", "None")
                    .replace("tenure.engine.data.config.", ""))


def _submodel(annotation) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _item_model(annotation) -> tuple[str, type[BaseModel]] | None:
    """('<name>' or '<i>', Model) for dict[str, Model] / list[Model] fields (optional or not)."""
    for candidate in (annotation, *typing.get_args(annotation)):
        origin, args = typing.get_origin(candidate), typing.get_args(candidate)
        if origin is dict and args and _submodel(args[-1]):
            return "<name>", args[-1]
        if origin is list and args and _submodel(args[0]):
            return "<i>", args[0]
    return None


def rows(model: type[BaseModel], prefix: str = "", expanded: dict | None = None):
    """(key, type, default, meaning) per config key; a section whose model was listed already
    (a stage's `optim`, a task's `data`) is one row pointing at the first listing."""
    expanded = {} if expanded is None else expanded
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        items = _item_model(field.annotation)
        sub = _submodel(field.annotation)
        if items is not None:
            yield key, _type_name(field.annotation).split("[")[0] + " of sections", "None", field.description or ""
            yield from rows(items[1], f"{key}.{items[0]}.", expanded)
            continue
        if sub is not None and sub in expanded:
            yield key, sub.__name__, "as there", f"{field.description or ''} (the keys of `{expanded[sub]}`)"
            continue
        if sub is not None:
            expanded[sub] = key
            yield from rows(sub, f"{key}.", expanded)
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
