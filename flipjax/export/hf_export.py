"""flipjax params -> a Hugging Face `SiglipModel` (or `CLIPModel`) directory with its processor.

The model is written by building the torch model from an HF config and loading our tensors with
`strict=True`, so a key the rename table misses fails the export instead of being left at
random init. The processor reproduces flipjax's eval preprocessing: a SentencePiece tokenizer
with sticky-EOS padding to `max_len` (a `tokenizers` conversion of our own .model, because
`SiglipTokenizer` strips punctuation, which flipjax does not; checked against SentencePiece before
anything is written) and `CLIPImageProcessor`'s bicubic resize with our mean/std, as the run's
`data.eval_resize` says: the short side + centre crop, or the whole image squashed to the square.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import sentencepiece as spm
import torch
import transformers
from absl import logging
from PIL import Image
from tokenizers import processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipModel,
    SiglipProcessor,
)
from transformers.convert_slow_tokenizer import SpmConverter
from transformers.utils import sentencepiece_model_pb2_new as sp_pb2  # matches our protobuf

from flipjax.config import ConfigError
from flipjax.data.tokenizer import EOS_ID
from flipjax.export.mapping import CLIP, HF_ACT, SIGLIP, flatten, rename_table
from flipjax.models.layers import unstack_layers
from flipjax.models.two_towers import embedding_dims, tower_size
from flipjax.models.vit import sincos2d_posemb
from flipjax.storage import storage_path
from flipjax.train.workdir import TOKENIZER_FILE, load_workdir_config, restore_params


class ExportError(ConfigError):
    """A model config with no HF equivalent, or an output it would overwrite; the message
    names the config field or the directory."""


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ExportError(f"config.model.{field}: {message}")


def choose_architecture(model_cfg: ml_collections.ConfigDict) -> str:
    """"siglip" or "clip": the HF model that computes exactly what `model_cfg` computes."""
    img, txt = model_cfg.image, model_cfg.text
    _require(img.pool != "gap", "image.pool",
             "'gap' has no HF equivalent: SiglipModel with vision_use_head=False returns no "
             "image embeddings and CLIPModel pools a class token; use 'map' or 'tok'")
    if img.pool == "map":
        _require(not img.pre_norm, "image.pre_norm", "SiglipModel has no LayerNorm before the "
                 "encoder (pre_norm=True exports only as CLIPModel, with pool='tok')")
        _require(not img.proj_dim, "image.proj_dim", "SiglipModel's vision tower has no "
                 "projection after the MAP head; set it to None")
        _require(txt.pool == "last", "text.pool",
                 f"SiglipModel pools the last token, got {txt.pool!r}")
        _require(not txt.causal, "text.causal", "SiglipModel's text tower is not causal")
        return SIGLIP
    _require(img.pool == "tok", "image.pool", f"unknown pool {img.pool!r}")
    _require(img.pre_norm, "image.pre_norm", "CLIPModel (class-token pooling) always applies "
             "a LayerNorm before the encoder; set it to True")
    _require(not (img.proj_dim and img.proj_bias), "image.proj_bias",
             "CLIPModel's visual_projection has no bias; set it to False")
    _require(txt.pool == "eos", "text.pool", f"CLIPModel pools the first EOS, got {txt.pool!r}")
    _require(txt.causal, "text.causal", "CLIPModel's text tower is causal; set it to True")
    _require(not (txt.proj_dim and txt.proj_bias), "text.proj_bias",
             "CLIPModel's text_projection has no bias; set it to False")
    _require(model_cfg.bias_init is None, "bias_init", "CLIPModel has no logit bias")
    return CLIP


def _dims(model_cfg: ml_collections.ConfigDict, flat: dict) -> dict:
    img_size, patch = tower_size(model_cfg.image, with_patch=True)
    txt_size, _ = tower_size(model_cfg.text, with_patch=False)
    depth = lambda tower: len({k.split("/")[3] for k in flat
                               if k.startswith(f"{tower}/encoder/layers/")})
    _require(img_size.width == flat["img/patch_embed/kernel"].shape[-1], "image.width",
             "does not match the checkpoint's parameters")
    return dict(img=img_size, txt=txt_size, patch=patch, img_depth=depth("img"),
                txt_depth=depth("txt"), vocab=flat["txt/token_embedding/embedding"].shape[0],
                out_dim=embedding_dims(model_cfg)[0])


def hf_config(model_cfg: ml_collections.ConfigDict, flat: dict, arch: str
              ) -> SiglipConfig | CLIPConfig:
    """The `SiglipConfig`/`CLIPConfig` whose model computes what flipjax's does."""
    d = _dims(model_cfg, flat)
    common = dict(hidden_act=HF_ACT[model_cfg.gelu], layer_norm_eps=model_cfg.ln_eps,
                  attention_dropout=0.0)
    # Sticky-EOS padding: EOS also pads, and there is no BOS (T5 id layout, flipjax.data).
    # The ids our tokenizers write, whatever `text.eos_id` says (read by "eos" pooling only,
    # which `validate` holds to EOS_ID).
    eos = EOS_ID
    text = dict(vocab_size=d["vocab"], hidden_size=d["txt"].width,
                intermediate_size=d["txt"].mlp_dim, num_hidden_layers=d["txt_depth"],
                num_attention_heads=d["txt"].num_heads,
                max_position_embeddings=model_cfg.text.max_len, pad_token_id=eos,
                eos_token_id=eos, bos_token_id=None, **common)
    vision = dict(hidden_size=d["img"].width, intermediate_size=d["img"].mlp_dim,
                  num_hidden_layers=d["img_depth"], num_attention_heads=d["img"].num_heads,
                  image_size=model_cfg.image.image_size, patch_size=d["patch"], num_channels=3,
                  **common)
    if arch == SIGLIP:
        return SiglipConfig(text_config={**text, "projection_size": d["out_dim"]},
                            vision_config={**vision, "vision_use_head": True})
    return CLIPConfig(text_config={**text, "projection_dim": d["out_dim"]},
                      vision_config={**vision, "projection_dim": d["out_dim"]},
                      projection_dim=d["out_dim"],
                      logit_scale_init_value=float(np.asarray(flat["t"])))


def to_hf_state_dict(flat: dict[str, np.ndarray], model_cfg: ml_collections.ConfigDict,
                     arch: str) -> dict[str, np.ndarray]:
    """HF state dict (float32 numpy) of flipjax's float32 host params, flattened per layer
    ('img/encoder/layers/0/...', as `export_model` makes them)."""
    flat = dict(flat)  # the sincos/identity/bias entries below are added to a copy
    d = _dims(model_cfg, flat)
    cls = int(model_cfg.image.pool == "tok")
    if "img/pos_embedding" not in flat:  # posemb="sincos2d": fixed values, exported as learned.
        grid = model_cfg.image.image_size // d["patch"]
        pe = sincos2d_posemb(grid, grid, d["img"].width)
        flat["img/pos_embedding"] = np.concatenate([np.zeros_like(pe[:, :cls]), pe], axis=1)
    # A tower without `head` outputs its width; HF always projects, so export the identity.
    for tower, width in (("img", d["img"].width), ("txt", d["txt"].width)):
        if f"{tower}/head/kernel" not in flat:
            flat[f"{tower}/head/kernel"] = np.eye(width, dtype=np.float32)
        # A head without bias (proj_bias=False) exports a zero one where HF has a bias.
        out_dim = flat[f"{tower}/head/kernel"].shape[-1]
        flat.setdefault(f"{tower}/head/bias", np.zeros((out_dim,), np.float32))
    flat.setdefault("b", np.zeros((), np.float32))
    if arch == CLIP:
        # HF CLIP's patch conv has no bias: adding it to every patch position is the same sum.
        flat["img/pos_embedding"] = flat["img/pos_embedding"].copy()
        flat["img/pos_embedding"][:, cls:] += flat.pop("img/patch_embed/bias")
    out: dict[str, np.ndarray] = {}
    parts: dict[str, dict[int, np.ndarray]] = {}
    for rule in rename_table(arch, d["img_depth"], d["txt_depth"]):
        value = rule.transform.to_hf(flat[rule.flip])
        if rule.part is None:
            out[rule.hf] = value
        else:
            parts.setdefault(rule.hf, {})[rule.part[0]] = value
    for key, chunks in parts.items():
        out[key] = np.concatenate([chunks[i] for i in sorted(chunks)], axis=0)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def export_model(params: dict, model_cfg: ml_collections.ConfigDict, output: str
                 ) -> SiglipModel | CLIPModel:
    """Writes `output/{config.json, model.safetensors}`; returns the torch model (eval mode)."""
    arch = choose_architecture(model_cfg)
    # Scanned layers are unstacked once, here: HF stores one module per layer.
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(unstack_layers(params)).items()}
    config = hf_config(model_cfg, flat, arch)
    model = (SiglipModel if arch == SIGLIP else CLIPModel)(config).eval()
    # torch.tensor copies: the arrays may be read-only views of JAX buffers.
    state = {k: torch.tensor(v) for k, v in to_hf_state_dict(flat, model_cfg, arch).items()}
    model.load_state_dict(state, strict=True)
    model.save_pretrained(output, safe_serialization=True)
    return model


# Texts the exported tokenizer must encode as SentencePiece does, besides every piece's own
# text: case, punctuation, spacing, digits and what NFKC normalisation rewrites.
TOKENIZER_PROBES = (
    "A young Woman with wavy brown hair, SMILING; clean-shaven?!",
    "  extra   spaces  ", "", "he's 25-30 years old (maybe) & wears glasses.",
    "Ünïcode ﬁ x² 日本 ½", "tab\there and a\nnewline",
)


def fast_tokenizer(spm_model: bytes, max_len: int) -> PreTrainedTokenizerFast:
    """Our SentencePiece model (the .model file's bytes) as a `tokenizers` tokenizer that
    appends EOS and pads with EOS, i.e. `padding="max_length", truncation=True` gives
    flipjax's `Tokenizer.encode` ids. Raises ExportError where it would give other ids than
    SentencePiece (`check_tokenizer`)."""
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(spm_model)
    # The converter builds BPE from a {piece: id} dict (merges ranked by score), unigram from
    # a [(piece, score)] list; our trainer makes nothing else.
    model_type = proto.trainer_spec.model_type
    if model_type == sp_pb2.TrainerSpec.BPE:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    elif model_type == sp_pb2.TrainerSpec.UNIGRAM:
        vocab = [(p.piece, p.score) for p in proto.pieces]
    else:
        raise ExportError(f"the tokenizer is a SentencePiece "
                          f"{sp_pb2.TrainerSpec.ModelType.Name(model_type)} model; only BPE and "
                          "unigram ones (python -m flipjax.data.tokenizer) convert exactly")
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    eos = proto.pieces[EOS_ID].piece
    backend.post_processor = processors.TemplateProcessing(single=f"$A {eos}",
                                                           special_tokens=[(eos, EOS_ID)])
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    # Input ids only: flipjax attends to the EOS padding and SigLIP pools the last position,
    # so an attention_mask hiding the padding would change the embeddings. Special-token
    # strings inside a caption ("</s>") are text, as SentencePiece reads them (BPE models; a
    # Unigram lattice still matches them as pieces).
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos, pad_token=eos, unk_token=unk,
        model_max_length=max_len, padding_side="right", truncation_side="right",
        model_input_names=["input_ids"], split_special_tokens=True)
    check_tokenizer(tokenizer, spm_model)
    return tokenizer


def check_tokenizer(tokenizer: PreTrainedTokenizerFast, spm_model: bytes) -> None:
    """Raises ExportError naming the first text that `tokenizer` encodes otherwise than the
    SentencePiece model does, among `TOKENIZER_PROBES` and every ordinary piece's text: a
    converter that drifts (transformers' changed between versions) would otherwise export a
    text tower fed other ids than it was trained on. Byte pieces ("<0x41>", byte fallback)
    name bytes rather than spell text, so their names are not probed."""
    sp = spm.SentencePieceProcessor(model_proto=spm_model)
    pieces = [sp.id_to_piece(i).replace("\u2581", " ") for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i))]
    texts = [*TOKENIZER_PROBES, *pieces]
    ours = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    for text, got, want in zip(texts, ours, sp.encode(texts), strict=True):
        if got != want:
            raise ExportError(
                f"the converted tokenizer encodes {text!r} as {got}, SentencePiece as {want} "
                f"(transformers {transformers.__version__}): this SentencePiece model does not "
                "convert exactly; export with the version the `hf` extra names, or use "
                "python -m flipjax.embed")


# How the processor frames an image for each `data.eval_resize`, as the card says it.
FRAMING = {"center_crop": "resizes the short side and crops the centre",
           "squash": "resizes the whole image, not keeping its aspect ratio,"}


def make_processor(arch: str, spm_model: bytes, max_len: int, image_size: int,
                   mean: tuple[float, ...], std: tuple[float, ...], eval_resize: str
                   ) -> SiglipProcessor | CLIPProcessor:
    """The processor (tokenizer + image processor) that turns captions and images into what
    flipjax's evaluation feeds the model (`spm_model`: the .model file's bytes)."""
    square = {"height": image_size, "width": image_size}
    if eval_resize == "squash":  # the whole image to the square, aspect ratio not kept
        resize = dict(size=square, do_center_crop=False)
    else:
        resize = dict(size={"shortest_edge": image_size}, do_center_crop=True, crop_size=square)
    image_processor = CLIPImageProcessor(
        do_resize=True, resample=Image.BICUBIC, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(mean), image_std=list(std), do_convert_rgb=True,
        **resize)
    processor_cls = SiglipProcessor if arch == SIGLIP else CLIPProcessor
    return processor_cls(image_processor=image_processor,
                         tokenizer=fast_tokenizer(spm_model, max_len))


def save_processor(processor: SiglipProcessor | CLIPProcessor, spm_model: bytes, output: str
                   ) -> None:
    """Writes the processor's config files, and the SentencePiece model beside them."""
    processor.save_pretrained(output)
    with open(os.path.join(output, "spiece.model"), "wb") as f:  # the source of truth
        f.write(spm_model)


def _eval_lines(workdir: str, step: int) -> list[str]:
    """Retrieval results (keys like 'retrieval/i2t_R@1') of the checkpoint at `step`: its
    metrics line's, and those `python -m flipjax.evaluate` wrote for it."""
    root = storage_path(workdir)
    records = []
    if (root / "metrics.jsonl").exists():
        lines = (root / "metrics.jsonl").read_text().splitlines()
        records = [r for r in map(json.loads, filter(str.strip, lines)) if r.get("step") == step]
    if (root / f"eval_step_{step}.json").exists():
        records.append(json.loads((root / f"eval_step_{step}.json").read_text())["results"])
    results = {k: v for r in records for k, v in r.items() if "R@" in k and v is not None}
    return [f"| {k} | {v:.4f} |" for k, v in sorted(results.items())]


def write_model_card(output: str, config: ml_collections.ConfigDict, workdir: str,
                     step: int, arch: str, vocab_size: int, eval_resize: str) -> None:
    """README.md of the export: usage, what training saw, the step's retrieval results and
    the run's config (as trained: `vocab_size` is the tokenizer's real piece count, and
    `eval_resize` the processor's framing, which the export may have chosen otherwise)."""
    model_cls = "SiglipModel" if arch == SIGLIP else "CLIPModel"
    m, data = config.model, config.data
    evals = _eval_lines(workdir, step)
    eval_text = (f"At step {step}:\n\n| metric | value |\n| --- | --- |\n" + "\n".join(evals)
                 if evals else f"The workdir holds no retrieval results of step {step}.")
    card = f"""---
library_name: transformers
pipeline_tag: zero-shot-image-classification
tags: [flipjax, {arch}, face, contrastive]
---
# flipjax {model_cls} ({m.image.variant} image tower, {m.text.variant} text tower)

Contrastive face image-text model trained with flipjax (JAX/Flax NNX) and exported to
`transformers.{model_cls}` at training step {step}. Exported logits match flipjax's in float32.

```python
from transformers import AutoModel, AutoProcessor
model, processor = AutoModel.from_pretrained(PATH), AutoProcessor.from_pretrained(PATH)
inputs = processor(text=captions, images=images, padding="max_length", truncation=True,
                   return_tensors="pt")
logits_per_image = model(**inputs).logits_per_image
```
Always pass `padding="max_length", truncation=True`: captions were padded with EOS to
{m.text.max_len} tokens in training, and the text tower reads the
{"last" if arch == SIGLIP else "first EOS"} token. The processor {FRAMING[eval_resize]} to
{m.image.image_size} px (`{eval_resize}`). Images were resized with PIL: with
transformers 5 and torchvision installed, load the processor with `backend="pil"` for the same
pixels (torchvision's resize moves a few by one grey level).

## Training data
Dataset `{data.name}` (builder config `{data.builder_config}`, split `{data.train_split}`), images
at {data.image_size} px (random resized crop {tuple(data.augment.crop_scale)}, flip
{data.augment.flip}), normalised with mean {tuple(data.mean)}, std {tuple(data.std)}.
Loss `{config.loss}`, {config.total_steps} steps at global batch {data.global_batch_size}.
Tokenizer: SentencePiece ({vocab_size} pieces, case-folded), `spiece.model`.

## Evaluation
{eval_text}

## Config
```json
{config.to_json(indent=2)}
```
"""
    with open(os.path.join(output, "README.md"), "w") as f:
        f.write(card)


def export_workdir(workdir: str, output: str, step: int | None = None,
                   tokenizer_path: str | None = None, overwrite: bool = False,
                   eval_resize: str | None = None) -> str:
    """Exports the checkpoint at `step` (default: latest) of `workdir`; returns the HF class.

    `tokenizer_path` stands in for the config's where the workdir holds no copy of the
    tokenizer (runs from before training kept one). A non-empty `output` is refused unless
    `overwrite`: the export would replace files of the same names (README.md among them).
    `eval_resize` ("center_crop" or "squash") is how the processor frames an image, by default
    the run's `data.eval_resize` (an evaluator may have used the other, e.g. FLIP's squashed
    CelebA portraits)."""
    config = load_workdir_config(workdir)
    if tokenizer_path and (storage_path(workdir) / TOKENIZER_FILE).exists():
        logging.warning("--tokenizer %s is not used: %s holds the run's own %s", tokenizer_path,
                        workdir, TOKENIZER_FILE)
    elif tokenizer_path:
        config.tokenizer.path = tokenizer_path
    eval_resize = eval_resize or config.data.eval_resize
    arch = choose_architecture(config.model)  # refuse before loading or writing anything
    if not overwrite and os.path.isdir(output) and os.listdir(output):
        raise ExportError(f"{output} is not empty; export into a new directory, or pass "
                          "--overwrite to replace the files an export writes there")
    params, step, _, tokenizer = restore_params(config, workdir, step)
    params = jax.device_get(params)
    spm_model = storage_path(tokenizer.model_path).read_bytes()
    # Built (its tokenizer checked) before anything is written: a refusal leaves no
    # half-written output behind.
    processor = make_processor(arch, spm_model, config.model.text.max_len,
                               config.model.image.image_size, tuple(config.data.mean),
                               tuple(config.data.std), eval_resize)
    os.makedirs(output, exist_ok=True)
    export_model(params, config.model, output)
    save_processor(processor, spm_model, output)
    write_model_card(output, config, workdir, step, arch, tokenizer.vocab_size, eval_resize)
    return "SiglipModel" if arch == SIGLIP else "CLIPModel"
