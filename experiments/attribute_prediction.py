"""Paper task 2, facial attribute prediction: linear probes on CelebA and LFWA (+ zero-shot).

    python -m experiments.attribute_prediction --workdir=DIR --data_dir=TFDS_DIR \
        [--datasets=celeba,lfwa] [--probes=embedding,layers,flip_recipe] [--step=N]

Needs `celeba` / `lfwa` built under TFDS_DIR (`python -m tfds_builders build ...`). Protocol:
towers frozen, one linear layer (40 independent sigmoid outputs, BCE), on the image embeddings
(`embedding`) or on FLIP's features (`layers`: class token, patch mean and max after blocks 4,
6, 8 and the last of FLIP's 12-block class-token tower, the same fractions of another depth;
a MAP-pooled tower's final pooled vector in the class token's place, no class token for
mean pooling: the report says which; one shared LayerNorm and learned
weights, as FLIP's attribute head); Adam with L2 x epochs chosen on the validation split
(CelebA's official one; LFWA has none, so a seeded 10% of its train split, whole identities, as
CelebA's splits keep people apart), test scored once. `flip_recipe` trains FLIP's head on the
layer features with FLIP's own recipe, nothing chosen: AdamW, weight decay 0.05, lr
cosine-decayed to 0 over 100 epochs, lr 0.3 at batch 64 (CelebA, on its train split) or 3e-3 at
batch 128 (LFWA, on its whole train split: one head, no validation carved; FLIP's LFWA epoch
count is not known, CelebA's is taken). Images are resized whole to the model's square input
(`--eval_resize=squash`, FLIP's `Resize((224, 224))`): a centre crop would cut the neck and the
top of the head off CelebA's 178x218 portraits, where Wearing_Necktie, Wearing_Hat and
Receding_Hairline are seen. Unlike the official FLIP code, no choice ever sees test data and the
LFWA head trains on LFWA train (FLIP's trained on 10% of test). Writes
experiments/results/attribute_prediction.md.
"""

from __future__ import annotations

import ml_collections

from experiments.common import benchmark_parser, evaluate, fmt, load_run, markdown_table, write
from flipjax.config import exit_on_config_error
from flipjax.models.two_towers import tower_size
from flipjax.models.vit import probe_blocks
from tfds_builders.builder_utils import CELEBA_ATTRIBUTE_NAMES

# FLIP's attribute heads (fflip_celeba_recognition.py): layer features, AdamW, nothing
# chosen; and each dataset's learning rate and batch.
FLIP_RECIPE = dict(features="layers", optimizer="adamw", l2_grid=(0.05,), epochs_grid=(100,))
FLIP_RECIPE_OF = {"celeba": dict(lr=0.3, probe_batch_size=64),
                  "lfwa": dict(lr=3e-3, probe_batch_size=128)}
# The probe fields of each `--probes` entry besides the splits (and FLIP_RECIPE_OF).
_GRID = dict(l2_grid=(0.0, 1e-4, 1e-3, 1e-2), epochs_grid=(10, 30, 100), probe_batch_size=1024)
PROBES = {"embedding": dict(features="embedding", **_GRID),
          "layers": dict(features="layers", **_GRID),
          "flip_recipe": FLIP_RECIPE}
SPLITS = {"celeba": dict(train_split="train", val_split="validation", test_split="test"),
          "lfwa": dict(train_split="train", val_split=None, val_fraction=0.1, seed=0,
                       val_group_key="identity", test_split="test")}


def layer_features_text(image_cfg: ml_collections.ConfigDict) -> str:
    """What the `layers` probes read from this run's image tower (`ViT.layer_features`)."""
    depth = tower_size(image_cfg, with_patch=True)[0].depth
    blocks = probe_blocks(None, depth)
    tok, pooled = image_cfg.pool == "tok", image_cfg.pool == "map"
    summary = "class token, patch mean and max" if tok else "patch mean and max"
    count = (3 if tok else 2) * (len(blocks) + 1) + pooled
    extra = "" if tok else (" with the last's MAP-pooled vector" if pooled else "") + (
        f" (`pool={image_cfg.pool!r}`: no class token)")
    return (f"{summary} of blocks {', '.join(map(str, blocks))} and the last, block "
            f"{depth},{extra} ({count} vectors)")


def validation_kind(results: dict, splits: dict) -> str:
    """The report's "validation" cell: where the probe's choice was made."""
    if splits.get("val_split"):
        return "official"
    return "carved from train" if results["val_carved"] else "none: one head, nothing chosen"


def main() -> None:
    parser = benchmark_parser(__doc__, datasets="celeba,lfwa",
                              out="experiments/results/attribute_prediction.md")
    parser.add_argument("--eval_resize", default="squash", choices=["squash", "center_crop"])
    parser.add_argument("--probes", default=",".join(PROBES),
                        help=f"comma-separated probes, of {', '.join(PROBES)}")
    args = parser.parse_args()

    datasets, probes = args.datasets.split(","), args.probes.split(",")
    unknown = set(probes) - set(PROBES)
    if unknown:
        parser.error(f"--probes: {sorted(unknown)} not among {list(PROBES)}")
    evals = {}
    for name in datasets:
        common = dict(dataset=name, builder_config=args.builder_config, data_dir=args.data_dir,
                      eval_resize=args.eval_resize, every_steps=1, batch_size=args.batch_size)
        for probe in probes:
            recipe = FLIP_RECIPE_OF[name] if probe == "flip_recipe" else {}
            evals[f"{name}_probe_{probe}"] = dict(
                type="linear_probe", label_key="attributes", kind="multilabel",
                **PROBES[probe], **recipe, **SPLITS[name], **common)
        evals[f"{name}_zeroshot"] = dict(type="zeroshot_attributes", split="test",
                                         label_key="attributes", **common)
    with exit_on_config_error():  # a dataset not built, a run not found: one line
        run = load_run(args.workdir, args.step)
        results = evaluate(run, evals)

    rows, attr_rows = [], []
    for name in datasets:
        z = results[f"{name}_zeroshot"]
        rows.append([name, "zero-shot", fmt(z["mean_acc"], 2), fmt(z["balanced_acc"], 2),
                     "", "", "", ""])
        for probe in probes:
            p = results[f"{name}_probe_{probe}"]
            rows.append([name, f"probe {probe}", fmt(p["mean_acc"], 2),
                         fmt(p["balanced_acc"], 2), fmt(p["majority_mean_acc"], 2),
                         f"{p['chosen_l2']:g} / {int(p['chosen_epochs'])}",
                         validation_kind(p, SPLITS[name]),
                         f"{int(p['num_train'])}/{int(p['num_val'])}/{int(p['num_test'])}"])
    columns = [f"{d}_{k}" for d in datasets for k in [f"probe_{p}" for p in probes]
               + ["zeroshot"]]
    for attr in CELEBA_ATTRIBUTE_NAMES:
        attr_rows.append([attr] + [fmt(results[c].get(f"acc/{attr}"), 2) for c in columns])
    text = (
        f"# Attribute prediction: `{args.workdir}` (step {run.step}), images "
        f"`{args.eval_resize}`\n\n"
        "Linear probes on the frozen image tower: on its embeddings, or on FLIP's layer features "
        f"({layer_features_text(run.config.model.image)}, through a shared "
        "LayerNorm and learned weights). mAcc = mean over the 40 attributes of test accuracy, "
        "%, at sigmoid > 0.5; hyperparameters chosen on validation only (`flip_recipe`: "
        "FLIP's fixed AdamW recipe on the layer features, nothing chosen). Majority: each "
        "attribute's most common train value. Zero-shot: prompt ensembles, no training.\n\n"
        + markdown_table(["dataset", "method", "mAcc", "bal. acc", "majority mAcc",
                          "chosen l2 or decay / epochs", "validation", "train/val/test"], rows)
        + "\n## Per attribute (test accuracy, %)\n\n"
        + markdown_table(["attribute"] + columns, attr_rows))
    write(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
