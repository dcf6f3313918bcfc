"""Paper task 2, facial attribute prediction: linear probes on CelebA and LFWA (+ zero-shot).

    python -m experiments.attribute_prediction --workdir=DIR --data_dir=TFDS_DIR \
        [--datasets=celeba,lfwa] [--step=N]

Needs `celeba` / `lfwa` built under TFDS_DIR (`python -m tfds_builders build ...`). Protocol:
towers frozen, one linear layer (40 independent sigmoid outputs, BCE) on the image embeddings;
L2 x epochs chosen on the validation split (CelebA's official one; LFWA has none, so a seeded
10% of its train split, whole identities, as CelebA's splits keep people apart), test scored
once. Images are resized whole to the model's square
input (`--eval_resize=squash`, FLIP's `Resize((224, 224))`): a centre crop would cut the neck
and the top of the head off CelebA's 178x218 portraits, where Wearing_Necktie, Wearing_Hat
and Receding_Hairline are seen. Unlike the official FLIP code, no choice ever sees
test data and the LFWA head trains on LFWA train (FLIP's trained on 10% of test). Writes
experiments/results/attribute_prediction.md.
"""

from __future__ import annotations

from experiments.common import benchmark_parser, evaluate, fmt, load_run, markdown_table, write
from tfds_builders.builder_utils import CELEBA_ATTRIBUTE_NAMES

SPLITS = {"celeba": dict(train_split="train", val_split="validation", test_split="test"),
          "lfwa": dict(train_split="train", val_split=None, val_fraction=0.1, seed=0,
                       val_group_key="identity", test_split="test")}


def main() -> None:
    parser = benchmark_parser(__doc__, datasets="celeba,lfwa",
                              out="experiments/results/attribute_prediction.md")
    parser.add_argument("--eval_resize", default="squash", choices=["squash", "center_crop"])
    args = parser.parse_args()

    run = load_run(args.workdir, args.step)
    datasets = args.datasets.split(",")
    evals = {}
    for name in datasets:
        common = dict(dataset=name, builder_config=None, data_dir=args.data_dir,
                      eval_resize=args.eval_resize, every_steps=1, batch_size=args.batch_size)
        evals[f"{name}_probe"] = dict(type="linear_probe", label_key="attributes",
                                      kind="multilabel", l2_grid=(0.0, 1e-4, 1e-3, 1e-2),
                                      epochs_grid=(10, 30, 100), probe_batch_size=1024,
                                      **SPLITS[name], **common)
        evals[f"{name}_zeroshot"] = dict(type="zeroshot_attributes", split="test",
                                         label_key="attributes", **common)
    results = evaluate(run, evals)

    rows, attr_rows = [], []
    for name in datasets:
        p, z = results[f"{name}_probe"], results[f"{name}_zeroshot"]
        rows.append([name, fmt(p["mean_acc"], 2), fmt(p["balanced_acc"], 2),
                     fmt(p["majority_mean_acc"], 2), fmt(z["mean_acc"], 2),
                     fmt(z["balanced_acc"], 2), f"{p['chosen_l2']:g} / {int(p['chosen_epochs'])}",
                     "carved from train" if p["val_carved"] else "official",
                     f"{int(p['num_train'])}/{int(p['num_val'])}/{int(p['num_test'])}"])
    for attr in CELEBA_ATTRIBUTE_NAMES:
        attr_rows.append([attr] + [fmt(results[f"{d}_{kind}"].get(f"acc/{attr}"), 2)
                                   for d in datasets for kind in ("probe", "zeroshot")])
    text = (
        f"# Attribute prediction: `{args.workdir}` (step {run.step}), images "
        f"`{args.eval_resize}`\n\n"
        "Linear probe on frozen image embeddings (mAcc = mean over the 40 attributes of test "
        "accuracy, %, at sigmoid > 0.5); hyperparameters chosen on validation only. Majority: "
        "each attribute's most common train value. Zero-shot: prompt ensembles, no training.\n\n"
        + markdown_table(["dataset", "probe mAcc", "probe bal. acc", "majority mAcc",
                          "zero-shot mAcc", "zero-shot bal. acc", "chosen l2 / epochs",
                          "validation", "train/val/test"], rows)
        + "\n## Per attribute (test accuracy, %)\n\n"
        + markdown_table(["attribute"] + [f"{d} {k}" for d in datasets
                                          for k in ("probe", "zero-shot")], attr_rows))
    write(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
