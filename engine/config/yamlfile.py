"""The one YAML loader tenure reads with (config files, overrides, bench and study files): safe
YAML that refuses a mapping key written twice, which plain YAML silently resolves to the last
one (a task defined twice, `optim:` twice). Keys merged in with `<<: *anchor` may be
overridden; only the keys written in the mapping itself must be unique."""
from __future__ import annotations

import re
from typing import Any

import yaml

MERGE_TAG = "tag:yaml.org,2002:merge"


class UniqueKeyLoader(yaml.SafeLoader):
    def compose_mapping_node(self, anchor):
        """Checks the keys written in the mapping as it is composed: construction flattens a merged
        anchor's keys into its node (a mapping that merges one which merges another and overrides a
        key would then show that key twice)."""
        node = super().compose_mapping_node(anchor)
        first_line = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is written twice (first on line {first_line[key]}); "
                                "YAML would silently keep the last one", key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return node


# YAML 1.1 (PyYAML) reads an integer with a leading zero as octal (`steps: 010` is 8) and one with
# colons as base 60 (`1:30` is 90): integers here are YAML 1.2's, decimal (leading zeros allowed),
# or 0o / 0x / 0b written out; `1:30` stays a string (and a number field refuses it).
_INT = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+|0b[01_]+)$")
UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))


def _construct_int(loader, node) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    base = {"0o": 8, "0x": 16, "0b": 2}.get(text[:2], 10)
    return int(text if base == 10 else text[2:], base)


UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load(text: str) -> Any:
    """`yaml.safe_load` that refuses duplicate mapping keys (yaml.YAMLError with the key's line)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
