"""'/'-joined names for pytree leaves, the keys that regex rules (sharding, freezing) match."""

from __future__ import annotations

from typing import Any

import jax


def key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path: tuple) -> str:
    return "/".join(key_name(k) for k in path)


def leaf_names(tree: Any) -> Any:
    """A tree like `tree` whose leaves are their own names, e.g. 'img/encoder/layers/0/...'."""
    return jax.tree_util.tree_map_with_path(lambda p, _: path_name(p), tree)
