"""Exports a flipjax training workdir as a Hugging Face model directory.

    python -m flipjax.export --workdir=DIR [--step=N] --output=OUT [--overwrite]
        [--eval_resize=center_crop|squash]

`OUT` then loads with `transformers.AutoModel.from_pretrained(OUT)` (a `SiglipModel`, or a
`CLIPModel` for class-token/causal-text configs) and `AutoProcessor.from_pretrained(OUT)`.
A config with no HF equivalent is refused with one line naming the config field.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flipjax.data.pipeline import EVAL_RESIZES


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="training workdir (config.json, "
                        "checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step; default latest")
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece .model, for a "
                        "workdir without tokenizer.model whose config's tokenizer.path does "
                        "not resolve from here (a workdir's own tokenizer.model is always "
                        "used)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty "
                        "--output, replacing files of the same names")
    parser.add_argument("--eval_resize", choices=sorted(EVAL_RESIZES), default=None,
                        help="how the image processor frames an image; default the run's "
                        "data.eval_resize")
    args = parser.parse_args(argv)
    try:
        from flipjax.export.hf_export import export_workdir
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] not in ("torch", "transformers", "tokenizers"):
            raise
        print(f"cannot export: {e}; install the Hugging Face extra: pip install "
              '"flipjax[hf]"', file=sys.stderr)
        return 2

    from flipjax.config import ConfigError

    try:
        model_cls = export_workdir(args.workdir, args.output, args.step, args.tokenizer,
                                   args.overwrite, args.eval_resize)
    except ConfigError as e:  # ExportError, or a workdir or step that does not restore
        print(f"cannot export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {model_cls} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
