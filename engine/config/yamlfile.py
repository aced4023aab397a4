"""The one YAML loader tenure reads with (config files, overrides, bench and study files): safe
YAML that refuses a mapping key written twice, which plain YAML silently resolves to the last
one (a task defined twice, `optim:` twice). Keys merged in with `<<: *anchor` may be
overridden; only the keys written in the mapping itself must be unique."""
from __future__ import annotations

from typing import Any

import yaml

MERGE_TAG = "tag:yaml.org,2002:merge"


class UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
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
        return super().construct_mapping(node, deep=deep)


def load(text: str) -> Any:
    """`yaml.safe_load` that refuses duplicate mapping keys (yaml.YAMLError with the key's line)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
