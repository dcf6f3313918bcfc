"""Command line: `python -m tfds_builders build NAME --data_dir=DIR [options]`.

Other tools (data preparation scripts, CI) call this exact interface, so keep it stable.
"""

from __future__ import annotations

import argparse
import sys
import time

import tfds_builders


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tfds_builders", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build a dataset as ArrayRecord")
    names = ", ".join(sorted(tfds_builders.BUILDERS))
    build.add_argument("name", help=f"builder name, one of: {names}")
    build.add_argument("--data_dir", required=True, help="TFDS data directory to write into")
    build.add_argument("--manual_dir", default=None, help="directory of manually downloaded files")
    build.add_argument("--num_workers", type=int, default=1, help="parallel worker processes")
    build.add_argument("--config", default=None, help="builder config name (default: the first)")
    build.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="set a field of that config (repeatable; VALUE read as the field's "
                       "type: text for a text field, else a Python literal) and name the "
                       "result, e.g. --set name=center_crop "
                       "--set img2dataset_resize_mode=center_crop")
    build.add_argument("--beam_pipeline_options", default=None,
                       help="build with Apache Beam, e.g. 'runner=DirectRunner'"
                       " or 'runner=DataflowRunner,project=P,region=R,temp_location=gs://B/tmp'")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parses `argv`, builds the dataset and prints the number of records per split."""
    parser = _parser()
    args = parser.parse_args(argv)
    malformed = [item for item in args.set if "=" not in item]
    if malformed:
        parser.error(f"--set takes FIELD=VALUE, got {', '.join(malformed)}")
    overrides = dict(item.split("=", 1) for item in args.set)
    try:
        tfds_builders.builder_class(args.name)
        config = (tfds_builders.configured(args.name, args.config, overrides) if overrides
                  else args.config)
    except ValueError as e:
        sys.exit(f"error: {e}")
    config_name = overrides.get("name", args.config)
    label = f" (config {config_name})" if config_name else ""
    print(f"Building {args.name}{label} into {args.data_dir} with {args.num_workers} worker(s)...")
    start = time.monotonic()
    builder = tfds_builders.build(args.name, args.data_dir, manual_dir=args.manual_dir,
                                  num_workers=args.num_workers, config=config,
                                  beam_pipeline_options=args.beam_pipeline_options)
    elapsed = time.monotonic() - start
    print(f"Built {builder.info.full_name} in {elapsed:.1f}s at {builder.data_dir}")
    for split_name, split in builder.info.splits.items():
        print(f"  {split_name}: {split.num_examples} records")


if __name__ == "__main__":
    main()
