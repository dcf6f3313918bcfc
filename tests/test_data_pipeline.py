import io
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import grain
import ml_collections
import numpy as np
import pytest
from conftest import load_config
from PIL import Image

from flipjax.config import ConfigError
from flipjax.data.pipeline import (
    EvalPreprocess,
    ProcessSlice,
    TrainPreprocess,
    center_crop,
    data_source,
    make_train_dataset,
    random_resized_crop,
)
from flipjax.data.tokenizer import (
    EOS_ID,
    Tokenizer,
    captions_of,
    same_tokenizer,
    text_of,
    train_sentencepiece,
)
from flipjax.data.tokenizer import main as tokenizer_main

REPO = Path(__file__).resolve().parents[1]


def tokenizer_of(config):
    return Tokenizer(config.tokenizer.path, config.tokenizer.max_len)


def test_tokenizer_sticky_eos_and_truncation(tiny_config):
    tok = tokenizer_of(tiny_config)
    ids = tok.encode("A young woman with blond hair.")
    assert ids.shape == (16,) and ids.dtype == np.int32
    n = int(np.argmax(ids == EOS_ID))
    assert n > 0 and np.all(ids[n:] == EOS_ID)
    assert tok.decode(ids) == "a young woman with blond hair."  # the model folds case
    long = tok.encode(" ".join(["smiling"] * 100))
    assert long[-1] == EOS_ID and np.all(long[:-1] != EOS_ID)


def test_a_tokenizer_with_other_special_ids_is_refused_saying_which(tmp_path):
    """SentencePiece's defaults (unk 0, bos 1, eos 2, no pad) would pool the text towers at
    the wrong token: one line with the ids found and how to make a fitting one."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([f"a face {i}" for i in range(200)]),
                                   model_writer=model, vocab_size=30, minloglevel=2)
    (tmp_path / "default.model").write_bytes(model.getvalue())
    with pytest.raises(ConfigError, match=r"has pad=-1, eos=2; flipjax's have pad=0, eos=1"):
        Tokenizer(str(tmp_path / "default.model"), 16)


def test_tokenizer_command_trains_on_a_built_dataset(tiny_config, tmp_path, capsys):
    """`python -m flipjax.data.tokenizer`, as the README and the missing-tokenizer error give
    it: reads the built dataset's captions and writes a model of the asked size that has
    learned them (whole words as pieces, decoding back case-folded)."""
    data, out = tiny_config.data, tmp_path / "spm.model"
    tokenizer_main([f"--dataset={data.name}", f"--data_dir={data.data_dir}",
                    f"--builder_config={data.builder_config}", "--vocab_size=300",
                    f"--output={out}"])
    assert f"wrote {out} (300 pieces)" in capsys.readouterr().out
    tok = Tokenizer(str(out), max_len=128)
    caption = data_source(data, "train")[0]["caption"].decode()
    ids = tok.encode(caption)
    assert tok.decode(ids) == caption.lower()
    assert int(np.argmax(ids == EOS_ID)) < len(caption.split()) * 2

    args = [f"--dataset={data.name}", f"--data_dir={data.data_dir}",
            f"--builder_config={data.builder_config}", f"--output={out}"]
    with pytest.raises(SystemExit):  # a run's config may name it: replaced only when told
        tokenizer_main(args)
    assert "exists; pass --overwrite" in capsys.readouterr().err
    # Flags the dataset does not fit: one line naming the flag, exit 2.
    for flag, message in (("--text_key=captions", r"--text_key='captions': .* has no such "
                                                  r"feature"),
                          ("--text_key=attributes", r"--text_key='attributes' is not a text "
                                                    r"feature"),
                          ("--split=dev", r"--split='dev'")):
        with pytest.raises(SystemExit) as exit_:
            tokenizer_main([*args, "--overwrite", flag])
        assert exit_.value.code == 2 and re.search(message, capsys.readouterr().err), flag
    with pytest.raises(SystemExit):
        tokenizer_main([*args[:-1], f"--output={tmp_path / 'spm'}"])
    assert "must end in .model" in capsys.readouterr().err


def test_train_batches_shapes_and_determinism(tiny_config):
    tok = tokenizer_of(tiny_config)
    first = next(iter(make_train_dataset(tiny_config.data, tok, seed=0)))
    again = next(iter(make_train_dataset(tiny_config.data, tok, seed=0)))
    other = next(iter(make_train_dataset(tiny_config.data, tok, seed=1)))
    assert first["image"].shape == (16, 32, 32, 3) and first["image"].dtype == np.uint8
    assert first["text"].shape == (16, 16) and first["text"].dtype == np.int32
    np.testing.assert_array_equal(first["image"], again["image"])
    np.testing.assert_array_equal(first["text"], again["text"])
    assert not np.array_equal(first["text"], other["text"])


def test_epochs_cover_the_split_and_reshuffle(tiny_config):
    """Each epoch sees every training record exactly once, in a new order."""
    tok = tokenizer_of(tiny_config)
    records = data_source(tiny_config.data, "train")
    expected = Counter(tok.decode(tok.encode(r["caption"].decode())) for r in records)
    it = iter(make_train_dataset(tiny_config.data, tok, seed=0))
    per_epoch = len(records) // 16  # 512 records, batches of 16: no remainder
    epochs = [[tok.decode(t) for _ in range(per_epoch) for t in next(it)["text"]]
              for _ in range(2)]
    assert Counter(epochs[0]) == expected == Counter(epochs[1])
    assert epochs[0] != epochs[1]

    # Batches of 24: an epoch is 21 batches (504 records), 8 records left out of each.
    tiny_config.data.global_batch_size = 24
    it = iter(make_train_dataset(tiny_config.data, tok, seed=0))
    for _ in range(3):
        epoch = Counter(tok.decode(t) for _ in range(21) for t in next(it)["text"])
        assert epoch.total() == 504 and not epoch - expected, epoch - expected


def test_consecutive_seeds_give_unrelated_record_orders(tiny_config):
    """Grain shuffles epoch e with its seed + e: run seeds are mixed before they reach it, or
    seed 1's first epoch would be seed 0's second (one caption per record: the texts show
    the order)."""
    tok = tokenizer_of(tiny_config)
    per_epoch = 512 // 16

    def epoch_texts(seed: int, epoch: int) -> list[tuple[int, ...]]:
        it = iter(make_train_dataset(tiny_config.data, tok, seed=seed))
        batches = [next(it)["text"] for _ in range(per_epoch * (epoch + 1))][-per_epoch:]
        return [tuple(t) for batch in batches for t in batch]

    assert epoch_texts(1, 0) != epoch_texts(0, 1)


def test_no_batch_spans_two_epochs_and_processes_split_each_batch():
    """10 records, global batch 4 over 2 processes: each epoch is 2 whole batches of distinct
    records and drops 2 others (different ones each epoch); the processes' rows put side by
    side are the one-process batch."""
    epochs = grain.MapDataset.range(10).shuffle(seed=0).repeat()
    whole = ProcessSlice(epochs, 10, index=0, count=1, local_batch=4)
    halves = [ProcessSlice(epochs, 10, index=i, count=2, local_batch=2) for i in range(2)]
    batches = [[whole[4 * k + r] for r in range(4)] for k in range(6)]
    for k, batch in enumerate(batches):
        assert batch == [halves[i][2 * k + r] for i in range(2) for r in range(2)]
    for e in range(3):
        seen = batches[2 * e] + batches[2 * e + 1]
        assert len(set(seen)) == 8
        assert seen == [epochs[10 * e + i] for i in range(8)]
    assert len({frozenset(batches[2 * e] + batches[2 * e + 1]) for e in range(3)}) > 1


def test_a_batch_larger_than_the_split_is_refused(tiny_config):
    tiny_config.data.global_batch_size = 1024  # the tiny train split has 512 records
    with pytest.raises(ConfigError, match=r"global_batch_size: 1024 is more than the 512 "
                                          r"records of config\.data\.train_split='train'"):
        make_train_dataset(tiny_config.data, tokenizer_of(tiny_config), seed=0)


def test_a_record_with_several_captions_trains_on_each_of_them(tiny_config):
    """MM-CelebA-HQ and CelebA-Dialog keep a list of captions per image: training draws one
    per visit, never the list's printed form."""
    tok = tokenizer_of(tiny_config)
    cfg = tiny_config.data.copy_and_resolve_references()
    cfg.text_key = "captions"
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 40), (90, 60, 30)).save(jpeg, format="JPEG")
    captions = ["a smiling woman.", "a man with a beard."]
    record = {"image": jpeg.getvalue(),
              "captions": np.array([c.encode() for c in captions], dtype=object)}
    preprocess = TrainPreprocess(cfg, tok)
    seen = {tok.decode(preprocess.random_map(record, np.random.default_rng(seed))["text"])
            for seed in range(20)}
    assert seen == set(captions)
    assert captions_of(record["captions"]) == captions == captions_of(captions)
    assert captions_of(b"one caption") == ["one caption"]
    with pytest.raises(TypeError, match="captions_of"):
        text_of(record["captions"])


def test_a_record_that_does_not_decode_is_named(tiny_config):
    """A dataset from other tools than tfds_builders may hold a broken record: the error
    names the split, the record's id and the field, in training and in evaluation."""
    good = data_source(tiny_config.data, "train")[0]
    train = TrainPreprocess(tiny_config.data, tokenizer_of(tiny_config))
    rng = np.random.default_rng(0)
    where = r"synthetic_faces/tiny split 'train', record id='r7'"
    with pytest.raises(ValueError, match=rf"{where}, field 'image': cannot identify image"):
        train.random_map({**good, "image": b"<html>", "id": b"r7"}, rng)
    cut = good["image"][: len(good["image"]) * 2 // 3]  # the header whole, the pixels not
    with pytest.raises(ValueError, match=rf"{where}, field 'image': image file is truncated"):
        train.random_map({**good, "image": cut, "id": b"r7"}, rng)
    with pytest.raises(ValueError, match=rf"{where}, field 'caption': holds no caption"):
        train.random_map({**good, "caption": [], "id": b"r7"}, rng)
    with pytest.raises(ValueError, match=rf"{where}, field 'caption': 'utf-8' codec"):
        train.random_map({**good, "caption": b"\xff", "id": b"r7"}, rng)
    with pytest.raises(ValueError, match=r"^test split, record id='r7', field 'image'"):
        EvalPreprocess(32, "image", "center_crop", "test split").map({"image": b"", "id": "r7"})


def test_crops():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
    assert center_crop(image, 32).size == (32, 32)
    for _ in range(20):
        assert random_resized_crop(image, 24, (0.5, 1.0), (0.75, 1.33), rng).size == (24, 24)
    # An impossible crop request falls back as torchvision's does: the whole image cut to the
    # nearest allowed aspect (the centre square where only 1 is allowed).
    np.testing.assert_array_equal(
        np.asarray(random_resized_crop(image, 24, (5.0, 6.0), (1.0, 1.0), rng)),
        np.asarray(center_crop(image, 24)))
    np.testing.assert_array_equal(  # 90 x 60 is wider than 4:3: 80 x 60 of it
        np.asarray(random_resized_crop(image, 24, (5.0, 6.0), (0.75, 4 / 3), rng)),
        np.asarray(image.resize((24, 24), Image.BICUBIC, box=(5, 0, 85, 60))))


@pytest.mark.parametrize("mode,want", [
    ("L", (67, 67, 67)),  # PIL's grey of (200, 10, 10)
    ("RGBA", (228, 133, 133)),  # half transparent, over white
    ("P", (200, 10, 10)),  # the web palette's colours, dithered: compared by their mean
    ("CMYK", (200, 10, 10))])  # within JPEG's error
def test_eval_preprocess_any_mode(mode, want):
    buf = io.BytesIO()
    image = Image.new("RGBA", (50, 40), (200, 10, 10, 128) if mode == "RGBA" else
                      (200, 10, 10, 255)).convert(mode)
    image.save(buf, format="PNG" if mode != "CMYK" else "JPEG")
    out = EvalPreprocess(32, "image", "center_crop", "test").map({"image": buf.getvalue(),
                                                                  "id": b"x"})
    assert out["image"].shape == (32, 32, 3) and out["id"] == b"x"
    np.testing.assert_allclose(out["image"].reshape(-1, 3).mean(0), want, atol=4)


@pytest.mark.parametrize("mode,fill,key", [
    ("RGB", (0, 0, 0), (0, 0, 0)), ("L", 0, 0), ("I;16", 0, 0)])
def test_a_png_colour_key_is_transparent_over_white(mode, fill, key):
    """PNG's tRNS chunk marks one colour as transparent (no alpha channel): those pixels are
    shown on white, as by an alpha channel and by the exported Hugging Face processor."""
    from tfds_builders.face_crop import to_rgb

    image = Image.new(mode, (8, 4), fill)
    image.paste(Image.new(mode, (4, 4), (200, 10, 10) if mode == "RGB" else 40000 if
                          mode == "I;16" else 150), (4, 0))
    buf = io.BytesIO()
    image.save(buf, format="PNG", transparency=key)
    decoded = Image.open(io.BytesIO(buf.getvalue()))
    assert decoded.info.get("transparency") is not None
    rgb = np.asarray(to_rgb(decoded))
    np.testing.assert_array_equal(rgb[:, :4], 255)  # the keyed colour
    right = {"RGB": (200, 10, 10), "L": (150,) * 3, "I;16": (round(40000 / 257),) * 3}[mode]
    np.testing.assert_array_equal(rgb[:, 4:], np.broadcast_to(right, (4, 4, 3)))


@pytest.mark.parametrize("values,shown", [
    (np.linspace(0, 1, 12, dtype=np.float32), np.linspace(0, 255, 12)),  # float within 0..1
    (np.linspace(0, 200, 12, dtype=np.float32), np.linspace(0, 200, 12)),  # 8-bit values
    (np.linspace(0, 65535, 12, dtype=np.float32), np.linspace(0, 255, 12))])  # 16-bit values
def test_float_images_are_shown_by_their_range(values, shown):
    """A float (mode F) TIFF within 0..1 is that range, as image editors read one; values
    above 1 are read as 8-bit, and above 255 as 16-bit."""
    from tfds_builders.face_crop import to_rgb

    buf = io.BytesIO()
    Image.fromarray(np.tile(values, (3, 1))).save(buf, format="TIFF")
    decoded = Image.open(io.BytesIO(buf.getvalue()))
    assert decoded.mode == "F"
    rgb = np.asarray(to_rgb(decoded))
    np.testing.assert_allclose(rgb[0, :, 0], shown, atol=0.51)
    assert (rgb == rgb[..., :1]).all()


def test_squash_keeps_what_a_centre_crop_cuts_off():
    """A CelebA-shaped portrait (178x218) with a red band at the top (a hat) and a blue one at
    the bottom (a necktie): "squash" (FLIP's evaluation resize) keeps both, the centre crop
    neither; an evaluator picks it with `eval_resize`."""
    from flipjax.evaluate import evaluator_data_config
    from flipjax.evaluate.features import model_fingerprint

    image = Image.new("RGB", (178, 218), (128, 128, 128))
    image.paste((255, 0, 0), (0, 0, 178, 15))
    image.paste((0, 0, 255), (0, 203, 178, 218))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    record = {"image": buf.getvalue()}
    squashed = EvalPreprocess(64, "image", "squash", "test").map(record)["image"]
    cropped = EvalPreprocess(64, "image", "center_crop", "test").map(record)["image"]
    assert squashed.shape == cropped.shape == (64, 64, 3)
    np.testing.assert_array_equal(squashed[0, 32], (255, 0, 0))
    np.testing.assert_array_equal(squashed[-1, 32], (0, 0, 255))
    assert cropped[:, :, 0].max() < 200 and cropped[:, :, 2].max() < 200
    config = load_config()
    data_cfg = evaluator_data_config(config, ml_collections.ConfigDict(dict(eval_resize="squash")))
    assert data_cfg.eval_resize == "squash"  # and it keys the feature cache apart:
    assert model_fingerprint(config.model, data_cfg) != model_fingerprint(config.model,
                                                                           config.data)


def test_tokenizer_training_on_a_sample_is_reproducible(tmp_path):
    """More captions than `input_sentence_size` (FaceCaption-15M's 13M against 2M) are
    sampled; the sample, and so the tokenizer, is the same in every process (SentencePiece's
    own sampling gave each process another one)."""
    script = (
        "import sys; from flipjax.data.tokenizer import train_sentencepiece\n"
        "texts = [f'caption {i}: a {\"young\" if i % 3 else \"old\"} face {i * 7919 % 1000}'"
        " for i in range(3000)]\n"
        "train_sentencepiece(texts, sys.argv[1], 200, input_sentence_size=500)\n")
    models = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.model"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, cwd=REPO)
        models.append(path.read_bytes())
    assert models[0] == models[1]


def test_same_tokenizer_compares_pieces_scores_and_normalisation(tmp_path):
    """Two models trained alike are the same tokenizer whatever their bytes; one with another
    vocabulary, or the same pieces under another normalisation (no case folding), is not."""
    import sentencepiece as spm


    texts = [f"A face number {i} with Words and more words" for i in range(300)]
    first = open(train_sentencepiece(texts, str(tmp_path / "a.model"), 60), "rb").read()
    again = open(train_sentencepiece(texts, str(tmp_path / "b.model"), 60), "rb").read()
    other = open(train_sentencepiece(texts, str(tmp_path / "c.model"), 50), "rb").read()
    assert same_tokenizer(first, again) and not same_tokenizer(first, other)

    def train(rule: str) -> bytes:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([t.lower() for t in texts]), model_writer=model,
            vocab_size=60, normalization_rule_name=rule, hard_vocab_limit=False, minloglevel=2)
        return model.getvalue()

    folded, kept = train("nmt_nfkc_cf"), train("nmt_nfkc")  # lowercase text: same pieces
    sp = [spm.SentencePieceProcessor(model_proto=m) for m in (folded, kept)]
    assert [sp[0].id_to_piece(i) for i in range(60)] == [sp[1].id_to_piece(i) for i in range(60)]
    assert not same_tokenizer(folded, kept)
