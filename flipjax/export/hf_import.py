"""Hugging Face `SiglipModel`/`CLIPModel` weights (safetensors only) -> flipjax params.

Used to start training from CLIP or SigLIP (`config.init_from`) and to check exports. Reads the
same rename table as export (`flipjax.export.mapping`). Every parameter is accounted for in the
returned `ImportReport`: loaded as is, reshaped (position embeddings resampled to a new grid or
truncated to a shorter text length), skipped (with the reason) or left untouched at init.
Pickled checkpoints (`.bin`, `.pth`, ...) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from flipjax.data.tokenizer import same_tokenizer
from flipjax.export.mapping import CLIP, FLIP_GELU, SIGLIP, flatten, rename_table, unflatten_into
from flipjax.models.layers import has_stacked_layers, stack_layers, unstack_layers
from flipjax.models.two_towers import tower_size
from flipjax.models.vit import sincos2d_posemb
from flipjax.storage import storage_path

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl", ".pickle")
MODEL_TYPES = {"siglip": SIGLIP, "clip": CLIP}


@dataclasses.dataclass
class ImportReport:
    """What happened to each parameter; `summary()` is what gets logged. `reshaped` holds
    every loaded value that is not the checkpoint's tensor as is, with what was done to it;
    `dropped` the checkpoint's tensors that the model's config has no place for (its own
    choice, e.g. `pool="gap"` for a MAP head; logged as a warning)."""

    loaded: list[str] = dataclasses.field(default_factory=list)
    reshaped: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)
    untouched: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} params, reshaped {len(self.reshaped)}, skipped "
                 f"{len(self.skipped)}, dropped {len(self.dropped)}, left at init "
                 f"{len(self.untouched)}"]
        lines += [f"  reshaped {k}: {v}" for k, v in self.reshaped.items()]
        lines += [f"  skipped {k}: {v}" for k, v in self.skipped.items()]
        lines += [f"  dropped {k}: {v}" for k, v in self.dropped.items()]
        lines += [f"  left at init {k}" for k in self.untouched]
        return "\n".join(lines)


def read_hf_dir(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json as a dict, float32 tensors) of an HF model directory saved as safetensors."""
    from safetensors import safe_open

    if os.path.isfile(path) and path.endswith(PICKLE_SUFFIXES):
        raise ValueError(f"refusing to unpickle {path}: pickled checkpoints can run code on "
                         "load; convert it to safetensors (save_pretrained) where you trust it")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a Hugging Face model directory")
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        pickles = [f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES)]
        raise ValueError(f"{path} has no .safetensors weights" + (
            f"; refusing to unpickle {pickles[0]}: convert it to safetensors "
            "(save_pretrained) where you trust it" if pickles else ""))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as f:  # torch reads bfloat16, numpy can't
            for key in f.keys():
                tensors[key] = f.get_tensor(key).float().numpy()
    return config, tensors


def hf_architecture(config: dict) -> str:
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not one of {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[model_type]


def model_config_from_hf(path: str) -> tuple[ml_collections.ConfigDict, int]:
    """(`config.model` for flipjax, vocab size) describing the HF model at `path`, so that
    `make_model` builds a network that computes what the HF one does."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(path)
    arch = hf_architecture(hf.to_dict())
    tc, vc = hf.text_config, hf.vision_config
    acts = {FLIP_GELU.get(tc.hidden_act), FLIP_GELU.get(vc.hidden_act)}
    if len(acts) != 1 or None in acts:
        raise ValueError(f"hidden_act text {tc.hidden_act!r} / vision {vc.hidden_act!r}: flipjax "
                         f"needs one activation of {sorted(FLIP_GELU)} for both towers")
    if tc.layer_norm_eps != vc.layer_norm_eps:
        raise ValueError("flipjax uses one layer_norm_eps for both towers; the HF config has "
                         f"text {tc.layer_norm_eps}, vision {vc.layer_norm_eps}")
    siglip = arch == SIGLIP
    if siglip and not vc.vision_use_head:
        raise ValueError("SigLIP with vision_use_head=False has no image embeddings to import")
    eos_id = tc.eos_token_id
    if not siglip and eos_id == 2:
        # HF's legacy CLIP configs mean "argmax of the ids": OpenAI's EOT is the last id.
        eos_id = tc.vocab_size - 1
    size = lambda c: dict(width=c.hidden_size, depth=c.num_hidden_layers,
                          mlp_dim=c.intermediate_size, num_heads=c.num_attention_heads)
    model = ml_collections.ConfigDict(dict(
        image=dict(variant=f"mu/{vc.patch_size}", **size(vc), image_size=vc.image_size,
                   pool="map" if siglip else "tok", posemb="learn", pre_norm=not siglip,
                   proj_dim=None if siglip else hf.projection_dim, proj_bias=siglip),
        text=dict(variant="mu", **size(tc), max_len=tc.max_position_embeddings,
                  pool="last" if siglip else "eos", causal=not siglip, eos_id=eos_id,
                  proj_dim=tc.projection_size if siglip else hf.projection_dim,
                  proj_bias=siglip),
        # Placeholders that create `t` (and `b` for SigLIP); the import overwrites both.
        # SigLIP has no temperature cap (trained ones end above CLIP's 100).
        temperature_init=10.0, bias_init=-10.0 if siglip else None,
        max_temperature=None if siglip else 100.0,
        gelu=acts.pop(), ln_eps=tc.layer_norm_eps, dtype="float32", remat="none",
        scan_layers=False, attention="auto",
    ))
    return model, tc.vocab_size


def resample_posemb(pos: np.ndarray, src_cls: int, shape: tuple[int, ...], dst_cls: int
                    ) -> np.ndarray:
    """(1, src_cls + g*g, D) -> `shape` = (1, dst_cls + h*h, D): bicubic resize of the patch
    grid; a class-token position is kept if both have one, zero if only the target has one."""
    grid = pos[:, src_cls:]
    g, h = math.isqrt(grid.shape[1]), math.isqrt(shape[1] - dst_cls)
    if g * g != grid.shape[1] or h * h + dst_cls != shape[1]:
        raise ValueError(f"position embeddings {pos.shape} -> {shape} are not square grids")
    grid = grid.reshape(g, g, -1)
    grid = np.asarray(jax.image.resize(grid, (h, h, grid.shape[-1]), "bicubic"))
    cls = pos[:, :src_cls] if src_cls else np.zeros((1, 1, pos.shape[-1]), pos.dtype)
    return np.concatenate([cls[:, :dst_cls], grid.reshape(1, h * h, -1)], axis=1)


def _num_layers(tensors: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in tensors if k.startswith(prefix)})


def check_same_computation(model_cfg: ml_collections.ConfigDict, path: str,
                           towers: Sequence[str]) -> None:
    """Raises ValueError where `model_cfg` would compute something else than the checkpoint's
    `towers` with the same weights: the settings no weight shape shows (activation, LayerNorm
    eps, head count, the text tower's mask and pooling, CLIP's pre-encoder LayerNorm).
    Poolings with parameters (MAP head, class token) show in the import report instead."""
    def settings(cfg: ml_collections.ConfigDict) -> dict[str, object]:
        out = {"gelu": cfg.gelu, "ln_eps": float(cfg.ln_eps)}
        if "img" in towers:
            out["image.num_heads"] = tower_size(cfg.image, with_patch=True)[0].num_heads
            out["image.pre_norm"] = cfg.image.pre_norm
        if "txt" in towers:
            out["text.num_heads"] = tower_size(cfg.text, with_patch=False)[0].num_heads
            out.update({"text.causal": cfg.text.causal, "text.pool": cfg.text.pool})
        return out

    ours, theirs = settings(model_cfg), settings(model_config_from_hf(path)[0])
    wrong = [f"config.model.{name} is {ours[name]!r}, the checkpoint's {theirs[name]!r}"
             for name in ours if ours[name] != theirs[name]]
    if wrong:
        raise ValueError("the model would compute something else with these "
                         f"weights: {'; '.join(wrong)}")


def check_same_tokenizer(path: str, tokenizer_path: str) -> None:
    """Raises ValueError unless the checkpoint ships a SentencePiece model (`spiece.model`, as
    SigLIP's and flipjax's exports do) that is the run's (`same_tokenizer`)."""
    theirs = os.path.join(path, "spiece.model")
    if not os.path.isfile(theirs):
        raise ValueError("loading the text tower needs the checkpoint's "
                         "tokenizer to be the run's, and it ships no spiece.model to compare; "
                         "flipjax's tokenizers are SentencePiece: load the image tower only, "
                         "config.init_from.towers=('img',)")
    with open(theirs, "rb") as f:
        same = same_tokenizer(f.read(), storage_path(tokenizer_path).read_bytes())
    if not same:
        raise ValueError("its spiece.model is not config.tokenizer.path "
                         f"{tokenizer_path!r} (other pieces for the same ids); set "
                         "config.tokenizer.path to the checkpoint's spiece.model, or load the "
                         "image tower only: config.init_from.towers=('img',)")


# Where CLIP keeps its image position embedding: (1 + patches, width), class position first.
POSEMB_KEY = "vision_model.embeddings.position_embedding.weight"


def bias_in_sincos_posemb(posemb: np.ndarray, width: int) -> np.ndarray | None:
    """The patch bias a flipjax `posemb="sincos2d"` run's CLIP export folded into the position
    embedding: the patch positions' embedding less the fixed sin-cos values, where that is
    one vector at every position, up to bfloat16's rounding (an export saved again in half
    precision); None otherwise (a learned embedding, e.g. OpenAI's CLIP, differs from sin-cos
    plus a constant by far more)."""
    patches = np.asarray(posemb, np.float64)[1:]
    grid = math.isqrt(len(patches))
    if grid < 2 or grid * grid != len(patches) or width % 4 or patches.shape[-1] != width:
        return None
    residual = patches - sincos2d_posemb(grid, grid, width)[0]
    bias = residual.mean(axis=0)
    if np.abs(residual - bias).max() > 2**-7 * max(1.0, float(np.abs(patches).max())):
        return None
    return bias


def load_into_params(params: dict, path: str, towers: Sequence[str],
                     model_cfg: ml_collections.ConfigDict, tokenizer_path: str | None = None
                     ) -> tuple[dict, ImportReport]:
    """Loads the HF model at `path` into `params` (an NNX pure dict) for `towers` ("img",
    "txt"; `t` and `b` only with both). Returns new params (replaced leaves are host arrays
    with the dtype of the leaf they replace; scanned layers are restacked, on the host where
    every layer was replaced) and the report, which is also logged.

    With `tokenizer_path` (training's) a text tower loads only from a checkpoint with the same
    tokenizer (`check_same_tokenizer`)."""
    unknown = set(towers) - {"img", "txt"}
    if unknown or not towers:
        raise ValueError(f"towers must be a non-empty subset of ('img', 'txt'), got {towers}")
    config, tensors = read_hf_dir(path)
    arch = hf_architecture(config)
    check_same_computation(model_cfg, path, towers)
    if tokenizer_path is not None and "txt" in towers:
        check_same_tokenizer(path, tokenizer_path)
    per_layer = unstack_layers(params)
    flat = flatten(per_layer)
    selected = set(towers) | ({"t", "b"} if set(towers) == {"img", "txt"} else set())
    table = rename_table(arch, _num_layers(tensors, "vision_model.encoder.layers."),
                         _num_layers(tensors, "text_model.encoder.layers."))
    report, updates = ImportReport(), {}
    src_cls, dst_cls = int(arch == CLIP), int(model_cfg.image.pool == "tok")
    for rule in table:
        if rule.flip.split("/")[0] not in selected:
            continue
        if rule.hf not in tensors:
            report.skipped[rule.flip] = f"{rule.hf} is not in the checkpoint"
            continue
        if rule.flip not in flat:
            has_head = rule.flip.removesuffix("bias") + "kernel" in flat
            if rule.flip.endswith("head/bias") and has_head and np.any(tensors[rule.hf] != 0):
                tower = "image" if rule.flip.startswith("img/") else "text"
                raise ValueError(f"config.model.{tower}.proj_bias=False "
                                 f"would drop the checkpoint's non-zero {rule.hf}, and the "
                                 "embeddings with it; set it to True")
            report.dropped[rule.flip] = f"the checkpoint's {rule.hf}: this model has none"
            continue
        value = tensors[rule.hf]
        if rule.part is not None:
            value = np.split(value, rule.part[1], axis=0)[rule.part[0]]
        value = rule.transform.from_hf(value)
        target = flat[rule.flip]
        if value.shape != tuple(target.shape):
            change = f"{value.shape} -> {tuple(target.shape)}"
            if rule.flip == "img/pos_embedding":
                value = resample_posemb(value, src_cls, tuple(target.shape), dst_cls)
                report.reshaped[rule.flip] = f"{change} (bicubic grid resample)"
            elif (rule.flip == "txt/pos_embedding" and value.shape[1] > target.shape[1]
                  and value.shape[2] == target.shape[2]):
                value = value[:, : target.shape[1]]
                report.reshaped[rule.flip] = f"{change} (first {target.shape[1]} positions)"
            else:
                report.skipped[rule.flip] = f"shape {value.shape} in the checkpoint, model has "\
                                            f"{tuple(target.shape)}"
                continue
        else:
            report.loaded.append(rule.flip)
        updates[rule.flip] = np.asarray(value, target.dtype)
    if arch == CLIP and "img/patch_embed/kernel" in updates and "img/patch_embed/bias" in flat:
        # CLIP's patch conv has no bias (it lives in the position embedding): zero ours, or,
        # where that embedding is dropped (posemb="sincos2d"), take the bias out of it.
        bias, sincos = flat["img/patch_embed/bias"], "img/pos_embedding" not in flat
        recovered = None
        if sincos and POSEMB_KEY in tensors:
            recovered = bias_in_sincos_posemb(tensors[POSEMB_KEY], bias.shape[-1])
        if recovered is not None:
            updates["img/patch_embed/bias"] = recovered.astype(bias.dtype)
            report.reshaped["img/patch_embed/bias"] = (
                "from the position embedding (a flipjax sincos2d export folds it in there)")
        else:
            updates["img/patch_embed/bias"] = np.zeros(bias.shape, bias.dtype)
            report.reshaped["img/patch_embed/bias"] = "set to zeros (CLIP has no patch bias)" + (
                "; a bias the dropped position embedding holds is lost" if sincos else "")
    cap = model_cfg.get("max_temperature")
    if "t" in updates and cap and float(np.exp(updates["t"]).max()) > cap * (1 + 1e-6):
        # Training clamps t after each step, the first included: the imported scale, and the
        # bias trained with it, would shift every logit before any learning.
        raise ValueError("the checkpoint's temperature "
                         f"{float(np.exp(updates['t']).max()):.4g} is above "
                         f"config.model.max_temperature {cap}; raise it, e.g. "
                         "--config.model.max_temperature=inf (SigLIP has no cap)")
    report.untouched = [k for k in flat if k.split("/")[0] in selected and k not in updates]
    logging.info("init_from %s (%s, towers %s): %s", path, arch, tuple(towers), report.summary())
    if report.dropped:
        logging.warning("init_from %s: the config has no place for %d of the checkpoint's "
                        "weights, left out: %s", path, len(report.dropped),
                        ", ".join(report.dropped))
    loaded = unflatten_into(per_layer, updates)
    return (stack_layers(loaded) if has_stacked_layers(params) else loaded), report
