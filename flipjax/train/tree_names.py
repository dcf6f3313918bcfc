"""'/'-joined names for pytree leaves, the keys that regex rules (sharding, freezing) match."""

from __future__ import annotations

from typing import Any

import jax


def path_name(path: tuple) -> str:
    """A key path as 'img/encoder/layers/0/...': dict keys, attribute names and indices."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def leaf_names(tree: Any) -> Any:
    """A tree like `tree` whose leaves are their own names, e.g. 'img/encoder/layers/0/...'."""
    return jax.tree_util.tree_map_with_path(lambda p, _: path_name(p), tree)
