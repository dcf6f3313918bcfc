"""The one rename table between flipjax parameters and Hugging Face `SiglipModel`/`CLIPModel`.

Export (`hf_export`) and import (`hf_import`) both read `rename_table`, so a name or layout fixed
here is fixed in both directions. Each row is a flipjax leaf name ('/'-joined, as in
`flipjax.train.tree_names`), the HF state-dict key, and the layout `Transform` between them.
The MAP head's q/k/v are the only many-to-one rows: torch's `nn.MultiheadAttention` stores them
as one `in_proj` tensor, so those rows name the part of it they fill.

What the table cannot say (identity projections for a tower without `head`, CLIP's bias-free
patch embedding, fixed sin-cos position embeddings) is handled, and commented, by the callers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from flipjax.train.tree_names import path_name

SIGLIP, CLIP = "siglip", "clip"


@dataclasses.dataclass(frozen=True)
class Transform:
    """How one array's layout differs between flipjax (flax) and HF (torch)."""

    name: str
    to_hf: Callable[[np.ndarray], np.ndarray]
    from_hf: Callable[[np.ndarray], np.ndarray]


COPY = Transform("copy", lambda x: x, lambda x: x)
# flax Dense kernels are (in, out); torch Linear weights are (out, in).
LINEAR = Transform("linear", lambda x: x.T, lambda x: x.T)
# flax Conv kernels are (h, w, in, out); torch Conv2d weights are (out, in, h, w).
CONV = Transform("conv", lambda x: x.transpose(3, 2, 0, 1), lambda x: x.transpose(2, 3, 1, 0))
# flipjax position embeddings carry a batch axis (1, N, D); HF stores an nn.Embedding (N, D).
POSEMB = Transform("posemb", lambda x: x[0], lambda x: x[None])
# `t` and `b` are scalars in flipjax and (1,) parameters in HF.
SCALAR = Transform("scalar", lambda x: np.reshape(x, (1,)), lambda x: np.reshape(x, ()))
# CLIP's class embedding is (D,); flipjax's class token is (1, 1, D).
TOKEN = Transform("token", lambda x: np.reshape(x, (-1,)), lambda x: np.reshape(x, (1, 1, -1)))


@dataclasses.dataclass(frozen=True)
class Rule:
    flip: str
    hf: str
    transform: Transform
    # (index, count): this leaf is part `index` of `count` equal slices (axis 0) of the HF tensor.
    part: tuple[int, int] | None = None


def _norm(flip: str, hf: str) -> list[Rule]:
    return [Rule(f"{flip}/scale", f"{hf}.weight", COPY), Rule(f"{flip}/bias", f"{hf}.bias", COPY)]


def _dense(flip: str, hf: str, *, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{flip}/kernel", f"{hf}.weight", LINEAR)]
    return rules + [Rule(f"{flip}/bias", f"{hf}.bias", COPY)] if bias else rules


def _encoder(flip: str, hf: str, depth: int) -> list[Rule]:
    """Pre-LN blocks: norm1/attn/norm2/mlp, the same names in every tower and both HF models."""
    rules = []
    for i in range(depth):
        f, h = f"{flip}/layers/{i}", f"{hf}.layers.{i}"
        rules += _norm(f"{f}/norm1", f"{h}.layer_norm1")
        for p in ("q", "k", "v", "out"):
            rules += _dense(f"{f}/attn/{p}", f"{h}.self_attn.{p}_proj")
        rules += _norm(f"{f}/norm2", f"{h}.layer_norm2")
        rules += _dense(f"{f}/mlp/fc1", f"{h}.mlp.fc1") + _dense(f"{f}/mlp/fc2", f"{h}.mlp.fc2")
    return rules


def _map_head(flip: str, hf: str) -> list[Rule]:
    rules = [Rule(f"{flip}/probe", f"{hf}.probe", COPY)]
    for i, p in enumerate(("q", "k", "v")):
        rules += [Rule(f"{flip}/attn/{p}/kernel", f"{hf}.attention.in_proj_weight", LINEAR,
                       (i, 3)),
                  Rule(f"{flip}/attn/{p}/bias", f"{hf}.attention.in_proj_bias", COPY, (i, 3))]
    rules += _dense(f"{flip}/attn/out", f"{hf}.attention.out_proj")
    rules += _norm(f"{flip}/norm", f"{hf}.layernorm")
    return rules + _dense(f"{flip}/mlp/fc1", f"{hf}.mlp.fc1") + _dense(f"{flip}/mlp/fc2",
                                                                       f"{hf}.mlp.fc2")


def rename_table(arch: str, img_depth: int, txt_depth: int) -> list[Rule]:
    """Every (flipjax leaf, HF key, transform) row of `arch` ("siglip" or "clip")."""
    if arch == SIGLIP:
        return [
            Rule("img/patch_embed/kernel", "vision_model.embeddings.patch_embedding.weight",
                 CONV),
            Rule("img/patch_embed/bias", "vision_model.embeddings.patch_embedding.bias", COPY),
            Rule("img/pos_embedding", "vision_model.embeddings.position_embedding.weight",
                 POSEMB),
            *_encoder("img/encoder", "vision_model.encoder", img_depth),
            *_norm("img/encoder/encoder_norm", "vision_model.post_layernorm"),
            *_map_head("img/map_head", "vision_model.head"),
            Rule("txt/token_embedding/embedding", "text_model.embeddings.token_embedding.weight",
                 COPY),
            Rule("txt/pos_embedding", "text_model.embeddings.position_embedding.weight", POSEMB),
            *_encoder("txt/encoder", "text_model.encoder", txt_depth),
            *_norm("txt/encoder/encoder_norm", "text_model.final_layer_norm"),
            *_dense("txt/head", "text_model.head"),
            Rule("t", "logit_scale", SCALAR),
            Rule("b", "logit_bias", SCALAR),
        ]
    if arch == CLIP:
        return [
            Rule("img/cls_token", "vision_model.embeddings.class_embedding", TOKEN),
            # HF CLIP's patch embedding has no bias; export folds flipjax's into pos_embedding.
            Rule("img/patch_embed/kernel", "vision_model.embeddings.patch_embedding.weight",
                 CONV),
            Rule("img/pos_embedding", "vision_model.embeddings.position_embedding.weight",
                 POSEMB),
            *_norm("img/pre_norm", "vision_model.pre_layrnorm"),
            *_encoder("img/encoder", "vision_model.encoder", img_depth),
            *_norm("img/encoder/encoder_norm", "vision_model.post_layernorm"),
            *_dense("img/head", "visual_projection", bias=False),
            Rule("txt/token_embedding/embedding", "text_model.embeddings.token_embedding.weight",
                 COPY),
            Rule("txt/pos_embedding", "text_model.embeddings.position_embedding.weight", POSEMB),
            *_encoder("txt/encoder", "text_model.encoder", txt_depth),
            *_norm("txt/encoder/encoder_norm", "text_model.final_layer_norm"),
            *_dense("txt/head", "text_projection", bias=False),
            Rule("t", "logit_scale", SCALAR),
        ]
    raise ValueError(f"unknown architecture {arch!r}; use {SIGLIP!r} or {CLIP!r}")


# HF `hidden_act` <-> flipjax `model.gelu` (see flipjax.models.layers.GELU_FLAVOURS).
HF_ACT = {"tanh": "gelu_pytorch_tanh", "exact": "gelu", "quick": "quick_gelu"}
FLIP_GELU = {**{v: k for k, v in HF_ACT.items()}, "gelu_new": "tanh"}


def flatten(params: dict) -> dict[str, Any]:
    """{'img/encoder/layers/0/norm1/scale': leaf, ...} from an NNX pure dict (int list keys):
    each leaf under the name the sharding and freezing rules match (`tree_names.path_name`)."""
    return {path_name(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def unflatten_into(params: dict, flat: dict[str, Any]) -> dict:
    """A copy of `params` (nested dicts) with the leaves named in `flat` replaced."""
    out = {k: unflatten_into(v, {}) if isinstance(v, dict) else v for k, v in params.items()}
    for name, value in flat.items():
        node = out
        *parents, leaf = [int(p) if p.isdigit() else p for p in name.split("/")]
        for p in parents:
            node = node[p]
        node[leaf] = value
    return out
