"""Linear probes on frozen image features (the paper's protocol: towers frozen, only a linear
layer trained).

`features="embedding"`: the image tower's L2-normalised embeddings, standardised with train
statistics, then the linear layer. `features="layers"`: FLIP's attribute head (its
`fflip_celeba_recognition.py`, after FaRL's): the class token, patch mean and patch max after
`blocks` (FLIP: 4, 6, 8) and after the last block, twelve vectors (a MAP-pooled tower has the
last block's pooled vector in place of class tokens: `ViT.layer_features`), through one
LayerNorm they share and a learned weighted sum, then the linear layer. `multilabel` fits one
independent sigmoid output per attribute (BCE; CelebA/LFWA's 40 attributes), `multiclass` one
softmax over the classes seen in train (e.g. `identity`).

The head trains with Adam at a constant `lr` and an L2 penalty in the loss (`optimizer="adam"`,
one run gives every epoch count of the grid), or with FLIP's recipe (`optimizer="adamw"`: AdamW
with decoupled weight decay on every parameter, the learning rate cosine-decayed to 0 over the
run, one run per epoch count; FLIP's CelebA head: lr 0.3, decay 0.05, 100 epochs, batch 64).

Hyperparameters (L2 penalty or weight decay x epochs) are chosen on the validation split only:
`select` never receives test data, and the test split is scored once, with the chosen head. This
is where the official FLIP code went wrong (it kept the checkpoint with the best *test*
accuracy, and its LFWA head trained on test images), so the separation is structural here and
tested, and splits that share a record (`test_split="train[:10%]"` beside `train_split=
"train"`) are refused. A dataset with no validation split (LFWA) gets a seeded subset carved
out of train, reported as `val_carved`, unless the grid holds one head (FLIP's recipe):
nothing is chosen, so it trains on the whole train split (`num_val` 0).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow_datasets as tfds
from absl import logging

from flipjax.data.pipeline import data_source
from flipjax.data.tokenizer import Tokenizer
from flipjax.evaluate.features import Embedder, image_features, label_array
from flipjax.evaluate.prompts import attribute_names

KINDS = ("multilabel", "multiclass")
FEATURES = ("embedding", "layers")
OPTIMIZERS = ("adam", "adamw")
# Rows per call when a fitted head scores a split: layer features are 12 vectors per image.
_SCORE_ROWS = 4096


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """A `linear_probe` evaluator's fields (`config.evals.NAME`), with their defaults."""

    train_split: str = "train"
    # None: validate on `val_fraction` of train carved out with `seed`, whole groups of
    # `val_group_key` (e.g. "identity") if set; a grid of one head needs none.
    val_split: str | None = None
    val_fraction: float = 0.1
    val_group_key: str | None = None
    test_split: str = "test"
    label_key: str = "attributes"
    kind: str = "multilabel"
    features: str = "embedding"
    # features="layers": the blocks read besides the last; None: FLIP's 4, 6, 8 of 12, at
    # those fractions of another depth (`vit.probe_blocks`).
    blocks: tuple[int, ...] | None = None
    # optimizer="adam": L2 penalties; "adamw": decoupled weight decays.
    l2_grid: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2)
    epochs_grid: tuple[int, ...] = (10, 30, 100)
    optimizer: str = "adam"
    lr: float = 3e-3
    probe_batch_size: int = 1024  # the head's training batch (`batch_size` embeds images)
    seed: int = 0

    def __post_init__(self) -> None:
        for field, value, allowed in (("kind", self.kind, KINDS),
                                      ("features", self.features, FEATURES),
                                      ("optimizer", self.optimizer, OPTIMIZERS)):
            if value not in allowed:
                raise ValueError(f"linear probe {field} {value!r} is not one of {allowed}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"linear probe val_fraction {self.val_fraction} must be in (0, 1)")
        if not self.l2_grid or not self.epochs_grid or min(self.epochs_grid) < 1:
            raise ValueError(f"linear probe l2_grid {self.l2_grid} and epochs_grid "
                             f"{self.epochs_grid} must be non-empty, with epochs >= 1")

    @property
    def chooses(self) -> bool:
        """Whether the grid holds more than one head, to choose among on validation."""
        return len(self.l2_grid) * len(self.epochs_grid) > 1


def head_logits(params: dict, x: jax.Array) -> jax.Array:
    """Logits of a head on standardised embeddings (N, D), or on layer features (N, F, D):
    those go through one LayerNorm the F vectors share (FLIP's, eps 1e-5 as PyTorch's) and
    their weighted sum (weights learned, no softmax, as FLIP's) before the linear layer."""
    x = x.astype(jnp.float32)
    if x.ndim == 3:
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(var + 1e-5) * params["ln_scale"] + params["ln_bias"]
        x = jnp.einsum("nfd,f->nd", x, params["mix"])
    return x @ params["w"] + params["b"]


@dataclasses.dataclass
class Head:
    """A fitted head with the train standardisation it expects (none for layer features,
    which the head's LayerNorm normalises)."""

    params: dict[str, np.ndarray]
    mean: np.ndarray | None  # None: layer features, left as they are
    std: np.ndarray | None
    classes: np.ndarray | None  # multiclass: label value of each output

    def logits(self, x: np.ndarray) -> np.ndarray:
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return np.concatenate([np.asarray(_head_logits(self.params, x[i:i + _SCORE_ROWS]))
                               for i in range(0, len(x), _SCORE_ROWS)])


_head_logits = jax.jit(head_logits)


def encode_classes(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Index of each label in the sorted `classes`, -1 for a class train never saw."""
    idx = np.clip(np.searchsorted(classes, labels), 0, len(classes) - 1)
    return np.where(classes[idx] == labels, idx, -1)


def disjoint_classes_message(split: str, count: int) -> str:
    """Why a multiclass probe whose `split` holds none of train's classes is refused."""
    return (f"multiclass probe: none of the {count} {split} labels is a class of the train "
            "split, so every prediction would be wrong; the splits share no class (CelebA and "
            "LFWA keep each identity in one split: probe identities within one split, or "
            "probe attributes)")


def predict(head: Head, x: np.ndarray, kind: str) -> np.ndarray:
    logits = head.logits(x)
    return (logits > 0).astype(np.int32) if kind == "multilabel" else logits.argmax(-1)


def multilabel_metrics(pred: np.ndarray, y: np.ndarray, names: Sequence[str]
                       ) -> dict[str, float]:
    """Accuracy per attribute, their mean, and the mean balanced accuracy (mean of TPR and TNR;
    an attribute with one class only in `y` counts that class's rate alone)."""
    correct = pred == y
    acc = correct.mean(axis=0)
    pos, neg = y == 1, y == 0
    with np.errstate(invalid="ignore"):
        tpr = (correct & pos).sum(0) / pos.sum(0)
        tnr = (correct & neg).sum(0) / neg.sum(0)
    balanced = np.nanmean(np.stack([tpr, tnr]), axis=0)
    out = {"mean_acc": 100.0 * float(acc.mean()),
           "balanced_acc": 100.0 * float(balanced.mean())}
    out.update({f"acc/{n}": 100.0 * float(a) for n, a in zip(names, acc, strict=True)})
    return out


def multiclass_metrics(pred: np.ndarray, y: np.ndarray, labels: np.ndarray
                       ) -> dict[str, float]:
    """Top-1 accuracy and balanced accuracy (mean recall over the classes of `labels`, the
    test labels `y` encodes); a class unseen in train (-1 in `y`) is always wrong, so it
    counts in both, with recall 0."""
    correct = pred == y
    _, group = np.unique(labels, return_inverse=True)
    recalls = np.bincount(group, weights=correct) / np.bincount(group)
    return {"acc": 100.0 * float(correct.mean()), "balanced_acc": 100.0 * float(recalls.mean())}


def score(head: Head, x: np.ndarray, y: np.ndarray, kind: str) -> float:
    """The selection criterion: mean accuracy over attributes, or accuracy."""
    return float((predict(head, x, kind) == y).mean())


def fit(xs: jax.Array, y: np.ndarray, probe: ProbeConfig, l2: float, num_outputs: int
        ) -> dict[int, dict[str, np.ndarray]]:
    """Trains a head on the mean BCE (or CE) of the standardised features `xs`, minibatches
    reshuffled each epoch, and returns its params after each epoch count in
    `probe.epochs_grid`. The bias starts at the train log-odds (log-prior), so an untrained
    head is the majority baseline, not a coin flip; a layer head's weighted sum starts as the
    mean of its F vectors.

    `adam`: a constant learning rate and l2/2 |theta|^2 over every weight but the output bias
    (a layer head's LayerNorm and mixing weights too: FLIP's AdamW decays its whole head, and a
    penalty on the linear layer alone is dodged by scaling the mix up); one run, read at each
    epoch count. `adamw`: FLIP's AdamW, decay `l2` on every parameter, the learning rate
    cosine-decayed to 0 over each epoch count's own run."""
    n, d = xs.shape[0], xs.shape[-1]
    bs = min(probe.probe_batch_size, n)
    steps = n // bs
    penalty = l2 if probe.optimizer == "adam" else 0.0

    def loss_fn(params, xb, yb):
        logits = head_logits(params, xb)
        if probe.kind == "multilabel":
            loss = optax.sigmoid_binary_cross_entropy(logits, yb.astype(jnp.float32)).mean()
        else:
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return loss + 0.5 * penalty * sum(jnp.sum(v**2) for k, v in params.items() if k != "b")

    if probe.kind == "multilabel":
        p = np.clip(y.mean(0), 1e-4, 1 - 1e-4)
        b0 = np.log(p / (1 - p))
    else:
        b0 = np.log(np.bincount(y, minlength=num_outputs) / n)
    init = {"w": jnp.zeros((d, num_outputs)), "b": jnp.asarray(b0, jnp.float32)}
    if xs.ndim == 3:
        init.update(ln_scale=jnp.ones(d), ln_bias=jnp.zeros(d),
                    mix=jnp.full(xs.shape[1], 1.0 / xs.shape[1]))
    ys = jnp.asarray(y)
    key = jax.random.key(probe.seed)

    def train(tx: optax.GradientTransformation, keep: Sequence[int]) -> dict:
        @jax.jit
        def epoch(params, opt_state, xs, ys, key):
            perm = jax.random.permutation(key, n)

            def body(carry, i):
                params, opt_state = carry
                idx = jax.lax.dynamic_slice(perm, (i * bs,), (bs,))
                grads = jax.grad(loss_fn)(params, xs[idx], ys[idx])
                updates, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), None

            return jax.lax.scan(body, (params, opt_state), jnp.arange(steps))[0]

        params, opt_state, fitted = init, tx.init(init), {}
        for e in range(1, max(keep) + 1):
            params, opt_state = epoch(params, opt_state, xs, ys, jax.random.fold_in(key, e))
            if e in keep:
                fitted[e] = jax.tree.map(np.asarray, params)
        return fitted

    if probe.optimizer == "adam":
        return train(optax.adam(probe.lr), probe.epochs_grid)
    return {epochs: train(optax.adamw(optax.cosine_decay_schedule(probe.lr, epochs * steps),
                                      weight_decay=l2), [epochs])[epochs]
            for epochs in probe.epochs_grid}


def select(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
           probe: ProbeConfig) -> tuple[Head, dict[str, float]]:
    """Fits every (l2, epochs) in the grid on train and keeps the best on validation (the first
    in grid order on ties); a grid of one head needs no validation (`val_y` may be empty).
    Takes no test data, by construction."""
    if not len(val_y) and probe.chooses:
        raise ValueError("choosing among the grid's heads needs validation records")
    if train_x.ndim == 2:
        mean, std = train_x.mean(0), train_x.std(0) + 1e-6
        xs = jnp.asarray((train_x - mean) / std, jnp.float32)
    else:  # layer features: the head's LayerNorm normalises them; float16 on the device
        mean = std = None
        xs = jnp.asarray(train_x)
    classes = None
    if probe.kind == "multiclass":
        classes = np.unique(train_y)
        train_y, val_y = encode_classes(train_y, classes), encode_classes(val_y, classes)
        num_outputs = len(classes)
        if len(val_y) and (val_y < 0).all():
            raise ValueError(disjoint_classes_message("validation", len(val_y)))
    else:
        num_outputs = train_y.shape[1]
    best, best_score, chosen, diverged = None, -math.inf, {}, []
    for l2 in probe.l2_grid:
        for epochs, params in fit(xs, train_y, probe, l2, num_outputs).items():
            if not all(np.isfinite(v).all() for v in params.values()):
                diverged.append(f"{l2:g} by epoch {epochs}")
                logging.warning("linear probe l2=%g epochs=%d diverged", l2, epochs)
                continue
            head = Head(params, mean, std, classes)
            if not len(val_y):  # the grid's one head: nothing to choose
                return head, {"chosen_l2": float(l2), "chosen_epochs": float(epochs)}
            val_score = score(head, val_x, val_y, probe.kind)
            logging.info("linear probe l2=%g epochs=%d val=%.4f", l2, epochs, val_score)
            if val_score > best_score:
                best, best_score = head, val_score
                chosen = {"chosen_l2": float(l2), "chosen_epochs": float(epochs)}
    if best is None:  # every head diverged (one that did is passed over while others did not)
        raise ValueError(f"the probe head diverged (non-finite parameters) with "
                         f"{'L2' if probe.optimizer == 'adam' else 'weight decay'} "
                         f"{', '.join(diverged)}: lower lr ({probe.lr:g})")
    return best, {**chosen, "val_score": 100.0 * best_score}


def record_ranges(info: tfds.core.DatasetInfo, split: str) -> list[tuple[str, int, int]]:
    """The records a split spec selects ("train[:10%]+test"), as (split, start, stop)."""
    out = []
    for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(info.splits):
        size = info.splits[part.splitname].num_examples
        out.append((part.splitname, part.from_ or 0, size if part.to is None else part.to))
    return out


def check_disjoint_splits(info: tfds.core.DatasetInfo, splits: dict[str, str | None]) -> None:
    """ValueError when two of a probe's splits ({field: spec}) share a record: a test record
    in train or validation is the leak the official FLIP code had."""
    ranges = {field: record_ranges(info, spec) for field, spec in splits.items() if spec}
    for (a, ranges_a), (b, ranges_b) in itertools.combinations(ranges.items(), 2):
        if any(name_a == name_b and max(start_a, start_b) < min(stop_a, stop_b)
               for name_a, start_a, stop_a in ranges_a for name_b, start_b, stop_b in ranges_b):
            raise ValueError(f"{a} {splits[a]!r} and {b} {splits[b]!r} share records; a "
                             "probe's train, validation and test records must be apart")


def carve_validation(n: int, fraction: float, seed: int, groups: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, val) index split of a train set, for datasets without a validation split.

    With `groups` (e.g. each image's identity) whole groups go to validation, in a seeded
    order, each one that brings it closer to `fraction` of the records: a
    person's attributes mostly stay the same across their photos, so a person on both sides
    would make validation an easy memory test and favour the least regularised head. A split
    that leaves either side empty is a ValueError.
    """
    rng = np.random.default_rng(seed)
    num_val = max(1, round(n * fraction))
    if groups is None:
        perm = rng.permutation(n)
        train, val = np.sort(perm[num_val:]), np.sort(perm[:num_val])
    else:
        names, group_of = np.unique(groups, return_inverse=True)
        sizes = np.bincount(group_of, minlength=len(names))
        taken, total = [], 0
        for group in rng.permutation(len(names)):  # each one that brings it closer
            if abs(total + sizes[group] - num_val) < abs(total - num_val):
                taken.append(group)
                total += sizes[group]
        in_val = np.isin(group_of, taken)
        train, val = np.flatnonzero(~in_val), np.flatnonzero(in_val)
    if not len(train) or not len(val):
        raise ValueError(f"carving {fraction:g} of {n} train records into validation leaves "
                         f"{len(train)} to train on and {len(val)} to validate on")
    return train, val


def linear_probe(train: dict[str, np.ndarray], val: dict[str, np.ndarray],
                 test: dict[str, np.ndarray], probe: ProbeConfig,
                 names: Sequence[str] | None = None) -> dict[str, float]:
    """Chooses a head on train/val, then scores it and the train-majority baseline on test.
    Each of train/val/test is {"features", "labels"}."""
    head, out = select(train["features"], train["labels"], val["features"], val["labels"],
                       probe)
    x, y = test["features"], test["labels"]
    if probe.kind == "multilabel":
        names = names or [f"attr_{i}" for i in range(y.shape[1])]
        out.update(multilabel_metrics(predict(head, x, probe.kind), y, names))
        majority = (train["labels"].mean(0) >= 0.5).astype(np.int32)
        out["majority_mean_acc"] = 100.0 * float((y == majority).mean())
    else:
        labels, y = y, encode_classes(y, head.classes)
        if len(y) and (y < 0).all():
            raise ValueError(disjoint_classes_message("test", len(y)))
        out.update(multiclass_metrics(predict(head, x, probe.kind), y, labels))
        values, counts = np.unique(train["labels"], return_counts=True)
        majority = encode_classes(values[[counts.argmax()]], head.classes)[0]
        out["majority_acc"] = 100.0 * float((y == majority).mean())
        out["test_unseen_class_frac"] = 100.0 * float((y < 0).mean())
    out.update(num_train=float(len(train["labels"])), num_val=float(len(val["labels"])),
               num_test=float(len(y)))
    return out


class LinearProbeEvaluator:
    """`type="linear_probe"`: the fields of `ProbeConfig`."""

    Config = ProbeConfig

    @staticmethod
    def reads(cfg: ProbeConfig, data_cfg: ml_collections.ConfigDict
              ) -> list[tuple[str, str, dict[str, str]]]:
        """(split field, split, {key field: feature}) of the records `run` reads."""
        keys = {"image_key": data_cfg.image_key, "label_key": cfg.label_key}
        group = {"val_group_key": cfg.val_group_key} if cfg.val_group_key else {}
        out = [("train_split", cfg.train_split, {**keys, **group}),
               ("test_split", cfg.test_split, keys)]
        return out + ([("val_split", cfg.val_split, keys)] if cfg.val_split else [])

    def __init__(self, cfg: ProbeConfig, data_cfg: ml_collections.ConfigDict,
                 tokenizer: Tokenizer, embedder: Embedder,
                 cache_dir: str | None = None):
        del tokenizer
        self.probe, self.data_cfg, self.embedder = cfg, data_cfg, embedder
        self.cache_dir = cache_dir
        check_disjoint_splits(data_source(data_cfg, cfg.train_split).dataset_info,
                              {"train_split": cfg.train_split, "val_split": cfg.val_split,
                               "test_split": cfg.test_split})

    def features(self, params: dict, split: str, step: int | None) -> dict[str, np.ndarray]:
        return image_features(self.embedder, params, self.data_cfg, split, self.probe.label_key,
                              layers=self.probe.features == "layers", blocks=self.probe.blocks,
                              cache_dir=self.cache_dir, step=step)

    def run(self, params: dict, step: int | None = None) -> dict[str, float]:
        probe = self.probe
        train = self.features(params, probe.train_split, step)
        if probe.val_split:
            val = self.features(params, probe.val_split, step)
            carved = 0.0
        elif not probe.chooses:  # one head: no validation to carve
            val, carved = {k: v[:0] for k, v in train.items()}, 0.0
        else:
            groups = None
            if probe.val_group_key:
                source = data_source(self.data_cfg, probe.train_split)
                groups = label_array([source[i][probe.val_group_key]
                                      for i in range(len(source))])
            tr, va = carve_validation(len(train["labels"]), probe.val_fraction, probe.seed,
                                      groups)
            train, val = ({k: v[tr] for k, v in train.items()},
                          {k: v[va] for k, v in train.items()})
            carved = 1.0
            logging.info("linear probe: no val_split, validating on %d train records carved "
                         "out with seed %d", len(va), probe.seed)
        test = self.features(params, probe.test_split, step)
        names = None
        if probe.kind == "multilabel":
            names = attribute_names(self.data_cfg, train["labels"].shape[1], probe.train_split)
        return {**linear_probe(train, val, test, probe, names), "val_carved": carved}
