"""Model sizes by name, decoded like big_vision's "B/16" strings."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Size:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int


# Widths, depths, MLP sizes and heads of the standard ViT family (Dosovitskiy et al.; big_vision).
SIZES: dict[str, Size] = {
    "mu": Size(width=32, depth=1, mlp_dim=128, num_heads=2),
    "Ti": Size(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": Size(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": Size(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": Size(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": Size(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "So400m": Size(width=1152, depth=27, mlp_dim=4304, num_heads=16),
    "H": Size(width=1280, depth=32, mlp_dim=5120, num_heads=16),
}


def decode_variant(variant: str, *, with_patch: bool) -> tuple[Size, int | None]:
    """Parses "B/16" (image tower) or "B" (text tower) into a `Size` and a patch size."""
    name, _, patch = variant.partition("/")
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r} in variant {variant!r}; "
                         f"known sizes: {', '.join(SIZES)}")
    if with_patch:
        if not patch.isdigit() or int(patch) <= 0:
            raise ValueError(f"image variant {variant!r} needs a patch size, e.g. 'B/16'")
        return SIZES[name], int(patch)
    if patch:
        raise ValueError(f"text variant {variant!r} takes no patch size, e.g. 'B'")
    return SIZES[name], None


def resolve_size(variant: str, overrides: dict, *, with_patch: bool) -> tuple[Size, int | None]:
    """The variant's size with any explicitly set width/depth/mlp_dim/num_heads applied."""
    size, patch = decode_variant(variant, with_patch=with_patch)
    set_fields = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(size, **set_fields), patch
