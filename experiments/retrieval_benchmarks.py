"""Paper task 1, text-image retrieval on MM-CelebA-HQ and CelebA-Dialog.

    python -m experiments.retrieval_benchmarks --workdir=DIR --data_dir=TFDS_DIR \
        [--datasets=mm_celeba_hq,celeba_dialog] [--step=N]

Needs the datasets built under TFDS_DIR. Scores the frozen towers' embeddings over each test
split (COCO protocol: every caption of an image is a query, an image query is answered by any of
its captions): MM-CelebA-HQ's 10 captions per image, CelebA-Dialog's overall caption (its
attribute-wise sentences, e.g. "This person is not wearing eyeglasses.", fit thousands of
images and are no retrieval queries). This is zero-shot retrieval: the official FLIP code
instead fine-tunes the projections and an ITM head, so its numbers are not comparable one to
one. Writes experiments/results/retrieval_benchmarks.md.
"""

from __future__ import annotations

from experiments.common import benchmark_parser, evaluate, fmt, load_run, markdown_table, write
from flipjax.config import exit_on_config_error

COLUMNS = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] + ["mean_R"]
# The gallery, without which a Recall@K means little (MM-CelebA-HQ's test: 6,000 images,
# 60,000 captions).
SIZES = ["num_images", "num_captions"]
TEXT_KEYS = {"mm_celeba_hq": "captions", "celeba_dialog": "caption"}


def main() -> None:
    parser = benchmark_parser(__doc__, datasets="mm_celeba_hq,celeba_dialog",
                              out="experiments/results/retrieval_benchmarks.md")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()

    datasets = args.datasets.split(",")
    evals = {name: dict(type="retrieval", dataset=name, builder_config=args.builder_config,
                        data_dir=args.data_dir, split=args.split, text_key=TEXT_KEYS[name],
                        every_steps=1, batch_size=args.batch_size) for name in datasets}
    with exit_on_config_error():  # a dataset not built, a run not found: one line
        run = load_run(args.workdir, args.step)
        results = evaluate(run, evals)
    rows = [[name] + [fmt(results[name][c]) for c in COLUMNS]
            + [str(int(results[name][c])) for c in SIZES] for name in datasets]
    text = (f"# Text-image retrieval: `{args.workdir}` (step {run.step}), split "
            f"`{args.split}`\n\nRecall@K in %, zero-shot (frozen towers, no fine-tuning); "
            "mean R is the mean of the six recalls (the FLIP code's `r_mean`); images and "
            "captions: the gallery searched.\n\n"
            + markdown_table(["dataset"] + [c.replace("_", " ") for c in COLUMNS]
                             + ["images", "captions"], rows))
    write(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
