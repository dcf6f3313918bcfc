"""Evaluation metrics against hand-made inputs with known answers (no model, no data)."""

import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from flipjax.evaluate.linear_probe import (
    ProbeConfig,
    carve_validation,
    encode_classes,
    fit,
    linear_probe,
    multiclass_metrics,
    multilabel_metrics,
    select,
)
from flipjax.evaluate.prompts import PROMPTS, prompts_for
from flipjax.evaluate.retrieval import (
    Ranks,
    block_rows,
    ranks_image_to_text,
    ranks_text_to_image,
    recall_at_k,
)
from flipjax.evaluate.zeroshot import class_embeddings, ensemble, zeroshot_predict
from tfds_builders.builder_utils import CELEBA_ATTRIBUTE_NAMES

# 3 images, 6 captions; captions 0,1 describe image 0, caption 2 image 1, captions 3,4 image 2,
# caption 5 image 3 (image 4 has none). With img = I and txt = S.T, img @ txt.T == S exactly.
OWNER = np.array([0, 0, 1, 2, 2, 3])
S = np.array([
    # c0   c1   c2   c3   c4   c5
    [0.1, 0.9, 0.8, 0.0, 0.2, 0.3],   # image 0: best own c1 (0.9), nothing above -> rank 0
    [0.5, 0.6, 0.4, 0.7, 0.1, 0.0],   # image 1: own c2 (0.4), c0 c1 c3 above -> rank 3
    [0.3, 0.2, 0.9, 0.1, 0.5, 0.4],   # image 2: best own c4 (0.5), c2 above -> rank 1
    [0.9, 0.8, 0.7, 0.6, 0.5, 0.2],   # image 3: own c5 (0.2), all 5 others above -> rank 5
    [0.9, 0.9, 0.9, 0.9, 0.9, 0.9],   # image 4: no caption
])
I2T = np.array([0, 3, 1, 5, 6])
# Caption j's rank: images scoring strictly above S[OWNER[j], j] in column j; c1 ties image 4
# at 0.9 and c4 ties image 3 at 0.5, so each is one place lower half the time.
T2I = np.array([4, 0, 4, 3, 1, 3])
T2I_TIED = np.array([0, 1, 0, 0, 1, 0])


def hand_made():
    return np.eye(len(S), dtype=np.float32), S.T.astype(np.float32)


@pytest.mark.parametrize("max_bytes", [1, 40, 1 << 28])
def test_ranks_known_and_independent_of_block_size(max_bytes):
    img, txt = hand_made()
    i2t = ranks_image_to_text(img, txt, OWNER, max_bytes)
    np.testing.assert_array_equal(i2t.above[:4], I2T[:4])
    np.testing.assert_array_equal(i2t.tied, 0)
    np.testing.assert_array_equal(i2t.tied_own, [1, 1, 1, 1, 0])  # image 4 has no caption
    t2i = ranks_text_to_image(img, txt, OWNER, max_bytes)
    np.testing.assert_array_equal(t2i.above, T2I)
    np.testing.assert_array_equal(t2i.tied, T2I_TIED)
    np.testing.assert_array_equal(t2i.tied_own, 1)


def test_recall_at_k_several_captions_per_image():
    img, txt = hand_made()
    r = recall_at_k(img, txt, OWNER, ks=(1, 2, 4), max_bytes=40)
    # Image queries are images 0-3 (image 4 has no caption): ranks 0, 3, 1, 5.
    assert r["i2t_R@1"] == pytest.approx(25.0)
    assert r["i2t_R@2"] == pytest.approx(50.0)
    assert r["i2t_R@4"] == pytest.approx(75.0)
    # Caption ranks 4, 0, 4, 3, 1, 3, c1 and c4 tied with one other image each.
    assert r["t2i_R@1"] == pytest.approx(50 / 6)
    assert r["t2i_R@2"] == pytest.approx(150 / 6)
    assert r["t2i_R@4"] == pytest.approx(400 / 6)
    assert r["mean_R"] == pytest.approx(np.mean([25, 50, 75, 50 / 6, 150 / 6, 400 / 6]))


def test_ties_among_own_captions_do_not_count_against_the_query():
    emb = np.eye(4, dtype=np.float32)
    owner = np.array([0, 1, 2, 3, 0])
    txt = np.concatenate([emb, emb[:1]])  # image 0's two captions embed identically
    r = recall_at_k(emb, txt, owner, ks=(1,))
    assert r == {"i2t_R@1": 100.0, "t2i_R@1": 100.0, "mean_R": 100.0, "num_images": 4.0,
                 "num_captions": 5.0}


def test_a_text_tower_that_ignores_its_input_scores_chance():
    """Every caption embeds the same: ranking images by any caption, or captions for any
    image, is a coin toss over the gallery, not a perfect score."""
    rng = np.random.default_rng(0)
    img = rng.normal(size=(8, 4)).astype(np.float32)
    txt = np.tile(rng.normal(size=(1, 4)).astype(np.float32), (8, 1))
    r = recall_at_k(img, txt, np.arange(8), ks=(1, 4))
    assert r["i2t_R@1"] == pytest.approx(100 / 8)
    assert r["i2t_R@4"] == pytest.approx(400 / 8)


@pytest.mark.parametrize("max_bytes", [1, 150 * 301 * 5, 1 << 28])
def test_ties_survive_rounding_of_any_block_shape(max_bytes):
    """Identical embeddings can come out of a product a rounding apart (numpy multiplies a
    one-row block another way): they still tie, whatever the block size."""
    rng = np.random.default_rng(1)
    img = rng.normal(size=(301, 512)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = np.repeat(img[:1] * 0.5 + img[1:2] * 0.5, 301, axis=0)
    r = recall_at_k(img, txt, np.arange(301), ks=(1,), max_bytes=max_bytes)
    assert r["i2t_R@1"] == pytest.approx(100 / 301)


def test_duplicate_captions_split_their_credit():
    """Images 0 and 1 share a caption string (identical embeddings): each image ranks its own
    copy first half the time; with k = 2 both copies fit."""
    img = np.eye(3, dtype=np.float32)
    shared = np.array([1.0, 1.0, 0.0], np.float32)
    txt = np.stack([shared, shared, img[2]])
    ranks = ranks_image_to_text(img, txt, np.arange(3))
    np.testing.assert_array_equal(ranks.tied, [1, 1, 0])
    np.testing.assert_allclose(ranks.hit_rate(1), [0.5, 0.5, 1.0])
    np.testing.assert_allclose(ranks.hit_rate(2), [1.0, 1.0, 1.0])


@pytest.mark.parametrize("above,tied,tied_own,k,expected", [
    (0, 0, 1, 1, 1.0), (1, 0, 1, 1, 0.0), (0, 1, 1, 1, 1 / 2), (0, 1, 2, 1, 2 / 3),
    (0, 3, 1, 2, 2 / 4), (0, 3, 2, 2, 1 - (3 / 5) * (2 / 4)), (2, 5, 1, 3, 1 / 6),
    (0, 0, 0, 5, 0.0),
])
def test_hit_rate_is_the_probability_under_random_tie_order(above, tied, tied_own, k, expected):
    ranks = Ranks(np.array([above]), np.array([tied]), np.array([tied_own]))
    assert ranks.hit_rate(k)[0] == pytest.approx(expected)
    # The same probability by enumerating every order of the tied items.
    orders = list(itertools.permutations([0] * tied + [1] * tied_own))
    hits = [above + order.index(1) < k for order in orders] if tied_own else [False]
    assert ranks.hit_rate(k)[0] == pytest.approx(np.mean(hits))


def test_non_finite_embeddings_are_an_error():
    img, txt = hand_made()
    img[2, 0] = np.nan
    with pytest.raises(ValueError, match="1 of 5 image embeddings hold NaN or Inf"):
        recall_at_k(img, txt, OWNER)


def test_block_rows_fits_budget_for_30k_by_300k():
    rows = block_rows(300_000, 1 << 28)
    assert rows * 300_000 * 5 <= 1 << 28 and rows >= 100
    assert block_rows(10, 1) == 1


def test_multilabel_metrics_known():
    y = np.array([[1, 0], [1, 1], [0, 1], [1, 1]])
    pred = np.array([[1, 1], [1, 1], [1, 1], [1, 1]])
    m = multilabel_metrics(pred, y, ["a", "b"])
    assert m["acc/a"] == pytest.approx(75.0) and m["acc/b"] == pytest.approx(75.0)
    assert m["mean_acc"] == pytest.approx(75.0)
    # Always-positive: TPR 1, TNR 0 on both -> balanced 50.
    assert m["balanced_acc"] == pytest.approx(50.0)


def test_multiclass_metrics_unseen_class_always_wrong():
    classes = np.array(["ann", "bob"])
    labels = np.array(["ann", "ann", "ann", "bob", "cid", "dan"])
    y = encode_classes(labels, classes)
    np.testing.assert_array_equal(y, [0, 0, 0, 1, -1, -1])
    m = multiclass_metrics(np.array([0, 0, 1, 1, 0, 0]), y, labels)
    assert m["acc"] == pytest.approx(50.0)
    # Each unseen class a recall of 0: they weigh in balanced accuracy as in accuracy.
    assert m["balanced_acc"] == pytest.approx(100 * (2 / 3 + 1 + 0 + 0) / 4)


def separable(n, seed, d=16, a=5):
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(99).normal(size=(d, a))
    x = rng.normal(size=(n, d)).astype(np.float32)
    return {"features": x, "labels": (x @ w > 0.3).astype(np.int32)}


PROBE = ProbeConfig(l2_grid=(0.0, 1e-1), epochs_grid=(1, 20), lr=1e-2, probe_batch_size=64)


def test_linear_probe_learns_separable_attributes():
    out = linear_probe(separable(1000, 0), separable(200, 1), separable(500, 2), PROBE)
    assert out["mean_acc"] > 93.0, out
    assert out["mean_acc"] > out["majority_mean_acc"] + 20
    assert set(out) >= {"chosen_l2", "chosen_epochs", "balanced_acc", "acc/attr_4"}


def test_a_grid_of_one_head_needs_no_validation():
    """FLIP's recipe (one l2, one epoch count) chooses nothing: it trains without validation
    records; a grid to choose from refuses to."""
    empty = {k: v[:0] for k, v in separable(1, 1).items()}
    one = dataclasses.replace(PROBE, l2_grid=(0.0,), epochs_grid=(20,))
    out = linear_probe(separable(1000, 0), empty, separable(500, 2), one)
    assert out["mean_acc"] > 90.0 and out["num_val"] == 0 and "val_score" not in out
    assert (out["chosen_l2"], out["chosen_epochs"]) == (0.0, 20.0)
    with pytest.raises(ValueError, match="needs validation records"):
        linear_probe(separable(1000, 0), empty, separable(500, 2), PROBE)


def layer_data(n, seed):
    """Layer features (N, F=5, D): the labels live in vector 2, the others are noise at
    another scale (as block outputs are)."""
    d = separable(n, seed)
    noise = np.random.default_rng(seed + 10).normal(size=(n, 4, 16)) * 30
    x = np.concatenate([noise[:, :2], d["features"][:, None], noise[:, 2:]], axis=1)
    return {"features": x.astype(np.float16), "labels": d["labels"]}


def test_layer_probe_finds_the_informative_vector():
    """FLIP's head on layer features: the shared LayerNorm and the learned weighted sum must
    find the vector that holds the labels."""
    probe = dataclasses.replace(PROBE, features="layers", epochs_grid=(30,), lr=3e-2)
    out = linear_probe(layer_data(1000, 0), layer_data(200, 1), layer_data(500, 2), probe)
    assert out["mean_acc"] > 90.0, out
    train = layer_data(1000, 0)
    mix = np.abs(fit(jnp.asarray(train["features"]), train["labels"], probe, 0.0, 5)[30]["mix"])
    assert mix.argmax() == 2 and mix[2] > 2 * np.delete(mix, 2).max(), mix


def test_flip_recipe_adamw_learns_and_decays_every_parameter():
    """`optimizer="adamw"` (FLIP's head recipe: AdamW, cosine to 0) learns the layer head; its
    decay is decoupled and reaches the output bias, which Adam's L2 penalty leaves alone."""
    flip = ProbeConfig(features="layers", optimizer="adamw", lr=3e-2, l2_grid=(0.05,),
                       epochs_grid=(10, 30), probe_batch_size=64)
    out = linear_probe(layer_data(1000, 0), layer_data(200, 1), layer_data(500, 2), flip)
    assert out["mean_acc"] > 90.0, out

    x = jnp.asarray(np.random.default_rng(0).normal(size=(512, 4)), jnp.float32)
    y = np.ones((512, 1), np.int32)
    y[:51] = 0  # prior 0.9: the bias starts at log 9 = 2.2 and the data keep it there
    strong = dict(l2_grid=(10.0,), epochs_grid=(5,), lr=0.1, probe_batch_size=64)
    bias = {opt: float(fit(x, y, ProbeConfig(optimizer=opt, **strong), 10.0, 1)[5]["b"][0])
            for opt in ("adam", "adamw")}
    assert bias["adam"] > 2.0 and bias["adamw"] < 1.0, bias
    with pytest.raises(ValueError, match="optimizer 'sgd' is not one of"):
        ProbeConfig(optimizer="sgd")


def test_a_diverged_probe_head_is_an_error():
    """A learning rate that drives the head to NaN (FLIP's recipe runs at lr 0.3) is named,
    not scored as the all-negative predictor NaN logits make."""
    probe = ProbeConfig(optimizer="adamw", l2_grid=(0.0,), epochs_grid=(3,), lr=1e38,
                        probe_batch_size=64)
    with pytest.raises(ValueError, match=r"diverged .* weight decay 0 by epoch 3: lower lr"):
        linear_probe(separable(300, 0), separable(100, 1), separable(100, 2), probe)


def test_multiclass_probe():
    def data(n, seed):
        d = separable(n, seed)
        return {"features": d["features"],
                "labels": np.array([f"c{v}" for v in d["features"][:, :2].argmax(1)])}

    probe = ProbeConfig(kind="multiclass", l2_grid=(0.0,), epochs_grid=(20,), lr=1e-2,
                        probe_batch_size=64)
    out = linear_probe(data(1000, 0), data(200, 1), data(500, 2), probe)
    assert out["acc"] > 90.0 and out["test_unseen_class_frac"] == 0.0
    # Test (or validation) labels none of which train saw, as identities on CelebA's official
    # splits: refused rather than scored 0.
    disjoint = data(500, 2)
    disjoint["labels"] = np.char.add("other_", disjoint["labels"])
    with pytest.raises(ValueError, match="none of the 500 test labels is a class of the train"):
        linear_probe(data(1000, 0), data(200, 1), disjoint, probe)
    choosing = dataclasses.replace(probe, epochs_grid=(5, 20))
    with pytest.raises(ValueError, match="none of the 500 validation labels"):
        linear_probe(data(1000, 0), disjoint, data(500, 2), choosing)


def test_probe_choice_never_depends_on_test():
    train, val, test = separable(1000, 0), separable(200, 1), separable(500, 2)
    clean = linear_probe(train, val, test, PROBE)
    rng = np.random.default_rng(5)
    poisoned = {"features": rng.normal(size=test["features"].shape).astype(np.float32) * 100,
                "labels": 1 - test["labels"]}
    dirty = linear_probe(train, val, poisoned, PROBE)
    for key in ("chosen_l2", "chosen_epochs", "val_score"):
        assert dirty[key] == clean[key]
    assert dirty["mean_acc"] < 60 < clean["mean_acc"]  # the poison did reach the test score
    # And the choice does follow validation: a val set with flipped labels picks otherwise.
    flipped = select(train["features"], train["labels"], val["features"], 1 - val["labels"],
                     PROBE)[1]
    assert (flipped["chosen_l2"], flipped["chosen_epochs"]) != (clean["chosen_l2"],
                                                                clean["chosen_epochs"])


def test_carve_validation_by_group_keeps_each_person_on_one_side():
    groups = np.repeat(np.array([f"p{i}" for i in range(30)]), np.arange(1, 31))  # 465 images
    tr, va = carve_validation(len(groups), 0.1, seed=0, groups=groups)
    assert not set(groups[tr]) & set(groups[va])
    assert sorted(np.concatenate([tr, va])) == list(range(len(groups)))
    largest = 30  # the closest count of whole groups is within half a group of 10%
    assert abs(len(va) - 0.1 * len(groups)) <= largest / 2
    # One big group and a small one: the small one alone is closest to 10%.
    groups = np.array(["big"] * 95 + ["small"] * 5)
    tr, va = carve_validation(100, 0.1, seed=0, groups=groups)
    assert set(groups[va]) == {"small"} and len(tr) == 95
    with pytest.raises(ValueError, match=r"leaves 100 to train on and 0 to validate on"):
        carve_validation(100, 0.1, seed=0, groups=np.array(["one"] * 100))
    with pytest.raises(ValueError, match=r"val_fraction 1.5 must be in \(0, 1\)"):
        ProbeConfig(val_fraction=1.5)
    np.testing.assert_array_equal(carve_validation(len(groups), 0.1, 0, groups)[1], va)


def test_carve_validation_is_seeded_and_disjoint():
    tr, va = carve_validation(100, 0.1, seed=3)
    assert len(va) == 10 and len(tr) == 90
    assert not set(tr) & set(va) and set(tr) | set(va) == set(range(100))
    np.testing.assert_array_equal(carve_validation(100, 0.1, seed=3)[1], va)
    assert not np.array_equal(carve_validation(100, 0.1, seed=4)[1], va)


def test_ensemble_and_zeroshot_predict():
    pos = ensemble(np.array([[2.0, 0.0], [0.0, 1.0]]))
    np.testing.assert_allclose(pos, [np.sqrt(0.5), np.sqrt(0.5)])
    neg = np.array([[-1.0, 0.0]])
    img = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_array_equal(zeroshot_predict(img, pos[None], neg), [[1], [0], [1]])


def test_class_embeddings_groups_prompts_by_attribute():
    names = ["Eyeglasses", "Male"]

    def fake_embed(texts):  # positive prompts -> +e_k, negative -> -e_k, for attribute k
        out = np.zeros((len(texts), 2))
        for i, t in enumerate(texts):
            for k, name in enumerate(names):
                pos, neg = prompts_for(name)
                out[i, k] = 1.0 if t in pos else -1.0 if t in neg else 0.0
        return out

    pos, neg = class_embeddings(fake_embed, names)
    np.testing.assert_allclose(pos, np.eye(2), atol=1e-6)
    np.testing.assert_allclose(neg, -np.eye(2), atol=1e-6)


def test_prompt_table_covers_celeba_and_synthetic_faces():
    from tfds_builders.synthetic_faces import ATTRIBUTE_NAMES

    assert set(CELEBA_ATTRIBUTE_NAMES) == set(PROMPTS) and len(CELEBA_ATTRIBUTE_NAMES) == 40
    assert set(ATTRIBUTE_NAMES) <= set(PROMPTS)
    for name in PROMPTS:
        pos, neg = prompts_for(name)
        assert pos and neg and not set(pos) & set(neg)
        # One subject on both sides (Male's aside): a gendered noun on one side only would
        # lean everyone of that gender towards it.
        if name != "Male":
            words = {w.strip(".,") for prompt in pos + neg for w in prompt.split()}
            assert not words & {"man", "men", "woman", "women", "guy", "lady"}, name
    with pytest.raises(KeyError, match="prompts.py"):
        prompts_for("Has_Tail")


def test_attribute_names_set_in_the_config_must_count_the_records_attributes():
    import ml_collections

    from flipjax.evaluate.prompts import attribute_names

    data_cfg = ml_collections.ConfigDict({"name": "faces", "attribute_names": ["Smiling", "Male"]})
    assert attribute_names(data_cfg, 2) == ["Smiling", "Male"]
    with pytest.raises(ValueError, match=r"the evaluator's attribute_names names 2 attributes, "
                                         r"but the 'test' records of dataset 'faces' have 3"):
        attribute_names(data_cfg, 3)


def test_evaluator_data_config_other_dataset_drops_builder_config():
    import ml_collections

    from flipjax.evaluate import evaluator_data_config

    config = ml_collections.ConfigDict({"data": {"name": "synthetic_faces",
                                                 "builder_config": "tiny", "data_dir": "d",
                                                 "text_key": "caption"}})
    same = evaluator_data_config(config, ml_collections.ConfigDict({"type": "retrieval"}))
    assert (same.name, same.builder_config) == ("synthetic_faces", "tiny")
    other = evaluator_data_config(config, ml_collections.ConfigDict(
        {"dataset": "mm_celeba_hq", "text_key": "captions", "data_dir": "e"}))
    assert (other.name, other.builder_config, other.text_key, other.data_dir) == (
        "mm_celeba_hq", None, "captions", "e")
