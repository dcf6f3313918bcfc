"""SentencePiece tokenizer: training on a dataset's captions, and fixed-length tokenisation.

Ids follow the T5/SigLIP layout (pad 0, eos 1, unk 2, no bos), as SigLIP's checkpoints and
tokenizers expect (the export writes a fast tokenizer from this model: `SiglipTokenizer` would
strip the punctuation it was trained with). Captions are tokenised to exactly `max_len` ids:
the pieces, then EOS, then EOS again as padding ("sticky EOS", big_vision). The last position
therefore always holds an EOS that has seen the whole caption, which last-token pooling reads.

Train one with:
    python -m flipjax.data.tokenizer --dataset=synthetic_faces --data_dir=DIR \
        --output=DIR/spm/synthetic_faces.model --vocab_size=1000
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from flipjax.storage import storage_path, write_bytes_whole

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def train_sentencepiece(texts: Iterable[str], output_path: str, vocab_size: int,
                        model_type: str = "bpe", input_sentence_size: int = 2_000_000) -> str:
    """Trains a SentencePiece model on `texts` and writes it to `output_path`.

    BPE by default: on captions written from a small grammar (FaceCaption-15M's are LLM
    rewrites of templates) unigram training prunes whole words away and leaves near-character
    pieces, while BPE keeps merging frequent words; `vocab_size` is a ceiling. Case is folded by
    the model's own normaliser (`nmt_nfkc_cf`), so the exported tokenizer lowercases exactly as
    training did. Past `input_sentence_size` texts (FaceCaption-15M's 13M captions) training
    reads a seeded sample of them (`sample_texts`): the same texts give the same tokenizer in
    every run, which SentencePiece's own sampling did not (another sample per process, its
    `set_random_generator_seed` notwithstanding).
    """
    if not output_path.endswith(".model"):
        raise ValueError(f"tokenizer output must end in .model, got {output_path!r}")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_texts(texts, input_sentence_size)), model_writer=model,
        vocab_size=vocab_size, model_type=model_type, normalization_rule_name="nmt_nfkc_cf",
        character_coverage=1.0, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        hard_vocab_limit=False, input_sentence_size=0, minloglevel=2)
    write_bytes_whole(storage_path(output_path), model.getvalue())
    return output_path


def sample_texts(texts: Iterable[str], size: int, seed: int = 0) -> list[str]:
    """A uniform random sample of `size` of `texts` (all of them if fewer), the same for the
    same texts and seed; one pass, `size` texts held (reservoir sampling, Li's algorithm L,
    which skips over the texts it will not keep instead of drawing for each)."""
    if size <= 0:
        raise ValueError(f"the sample size must be positive, got {size}")
    rng = np.random.default_rng(seed)
    stream = iter(texts)
    sample = list(itertools.islice(stream, size))
    if len(sample) < size:
        return sample
    w = math.exp(math.log(rng.random()) / size)
    while True:
        skip = math.floor(math.log(rng.random()) / math.log1p(-w))
        kept = next(itertools.islice(stream, skip, None), None)
        if kept is None:
            return sample
        sample[rng.integers(size)] = kept
        w *= math.exp(math.log(rng.random()) / size)


def same_tokenizer(a: bytes, b: bytes) -> bool:
    """Whether two SentencePiece models (file bytes) give a text the same ids: the same
    pieces, scores and piece types, id for id (a trained token embedding read through the
    other would give ids other pieces' vectors; SigLIP's and our tokenizers share id layout
    and 32k size, so shapes can't tell), and the same ids for a text that normalisation
    rules would change (sentencepiece exposes those rules only through a protobuf module that
    conflicts with the protobuf JAX needs)."""
    def identity(model: bytes) -> tuple[list, list[int]]:
        sp = spm.SentencePieceProcessor(model_proto=model)
        pieces = [(sp.id_to_piece(i), sp.get_score(i), sp.is_control(i), sp.is_unknown(i),
                   sp.is_unused(i), sp.is_byte(i)) for i in range(sp.get_piece_size())]
        return pieces, sp.encode(_NORMALISATION_PROBE)

    return a == b or identity(a) == identity(b)


# Full-width letters, ligatures, accents, case, runs of spaces: what NFKC, case folding and
# whitespace rules treat differently.
_NORMALISATION_PROBE = "Ａ ﬁne FACE,  with Élan — and ½ a smile\t"


def text_of(value: bytes | str) -> str:
    """A record's text field as text: TFDS string features read back as UTF-8 bytes."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    raise TypeError(f"expected one string, got {type(value).__name__}; a field holding "
                    "several captions is read with captions_of")


def captions_of(value: bytes | str | Sequence[bytes | str]) -> list[str]:
    """A record's captions: one string (e.g. FaceCaption's `caption`) or a sequence of them
    (MM-CelebA-HQ's and CelebA-Dialog's `captions`, read back as an array)."""
    if isinstance(value, bytes | str):
        return [text_of(value)]
    return [text_of(v) for v in value]


class Tokenizer:
    """Turns captions into fixed-length int32 ids (pieces, EOS, EOS padding)."""

    def __init__(self, model_path: str, max_len: int):
        path = storage_path(model_path)
        if not path.exists():
            raise FileNotFoundError(
                f"tokenizer model {model_path!r} does not exist; train one with "
                "`python -m flipjax.data.tokenizer --dataset=NAME --data_dir=DIR "
                f"[--builder_config=CONFIG] --vocab_size=N --output={model_path}`")
        self.model_path, self.max_len = model_path, max_len
        self.sp = spm.SentencePieceProcessor(model_proto=path.read_bytes())
        if self.sp.eos_id() != EOS_ID or self.sp.pad_id() != PAD_ID:
            from flipjax.config import ConfigError  # flipjax.config imports this module

            raise ConfigError(f"tokenizer {model_path!r} has pad={self.sp.pad_id()}, "
                              f"eos={self.sp.eos_id()}; flipjax's have pad={PAD_ID}, "
                              f"eos={EOS_ID} (the text towers pool at EOS): train one with "
                              "`python -m flipjax.data.tokenizer`")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __getstate__(self) -> dict:
        # SentencePieceProcessor is not picklable; Grain workers rebuild it from the path.
        return {"model_path": self.model_path, "max_len": self.max_len}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"], state["max_len"])

    def fits(self, text: str) -> bool:
        """Whether `encode` keeps every piece of `text` (it keeps max_len - 1, then EOS)."""
        return len(self.sp.encode(text)) < self.max_len

    def encode(self, text: str) -> np.ndarray:
        pieces = self.sp.encode(text)[: self.max_len - 1]
        ids = np.full((self.max_len,), EOS_ID, np.int32)
        ids[: len(pieces)] = pieces
        return ids

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.encode(t) for t in texts]) if texts else np.zeros(
            (0, self.max_len), np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids if i not in (EOS_ID, PAD_ID)])


def dataset_texts(name: str, data_dir: str, split: str, text_key: str,
                  builder_config: str | None = None,
                  fields: tuple[str, str] = ("--split", "--text_key")) -> Iterator[str]:
    """The captions of a built TFDS dataset (ArrayRecord, read without TensorFlow). The split
    and `text_key` are checked here, not once SentencePiece pulls the first caption, so that
    an error names their `fields` (flags or config fields) rather than surfacing from inside
    its trainer."""
    import ml_collections

    from flipjax.config import ConfigError
    from flipjax.data.pipeline import data_source

    source = data_source(ml_collections.ConfigDict(
        {"name": name, "builder_config": builder_config, "data_dir": data_dir}), split,
        fields[0], {fields[1]: text_key})
    try:  # a feature that holds no text (e.g. `attributes`)
        captions_of(source[0][text_key])
    except (TypeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{fields[1]}={text_key!r} is not a text feature: {e}") from None
    return (c for i in range(len(source)) for c in captions_of(source[i][text_key]))


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="TFDS name, e.g. synthetic_faces")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--builder_config", default=None, help="TFDS builder config, if any")
    parser.add_argument("--split", default="train")
    parser.add_argument("--text_key", default="caption")
    parser.add_argument("--vocab_size", type=int, default=32_000)
    parser.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"])
    parser.add_argument("--output", required=True, help="path of the .model file to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output")
    args = parser.parse_args(argv)
    if not args.output.endswith(".model"):
        parser.error(f"--output={args.output} must end in .model")
    if storage_path(args.output).exists() and not args.overwrite:
        # Runs keep a copy of their tokenizer, but configs that name this path would silently
        # pair new ids with embeddings trained on the old ones.
        parser.error(f"{args.output} exists; pass --overwrite to replace it")
    from flipjax.config import ConfigError

    try:
        texts = dataset_texts(args.dataset, args.data_dir, args.split, args.text_key,
                              args.builder_config)
    except ConfigError as e:  # a split or feature the dataset lacks: one line, exit 2
        parser.error(str(e))
    path = train_sentencepiece(texts, args.output, args.vocab_size, args.model_type)
    print(f"wrote {path} ({Tokenizer(path, max_len=1).vocab_size} pieces)")


if __name__ == "__main__":
    main()
