"""SentencePiece text tokenizer: a thin wrapper, plus on-the-fly training of random tokenizers for tests.

The released tokenizers use ids 0..3 as ``<unk>, <s>, </s>, <pad>`` (DSM-SPEC §1.2, §8.5); the random ones are
trained with the same special ids so that the engine's special-token logic is exercised unchanged.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import sentencepiece as spm

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

_ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "w", "x", "z",
           "ch", "sh", "th", "tr", "pl", "br", "gr", "st", "fl")
_NUCLEI = ("a", "e", "i", "o", "u", "y", "ai", "ou", "ea", "ie", "é", "è", "à")
_CODAS = ("", "", "", "n", "r", "s", "l", "t", "m", "x", "nd", "st")


class TokenizerError(ValueError):
    """A tokenizer file is missing or is not a SentencePiece model."""


def _pseudo_word(rng: random.Random) -> str:
    n = rng.choice((1, 1, 2, 2, 2, 3, 3, 4))
    return "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(n))


def random_corpus(vocab_size: int, seed: int = 0) -> list[str]:
    """Sentences of pseudo-words, with enough distinct material to train a ``vocab_size`` vocabulary."""
    rng = random.Random(seed)
    lexicon_size = max(200, 2 * vocab_size)
    lexicon = sorted({_pseudo_word(rng) for _ in range(lexicon_size)})
    # Zipf-like word frequencies so that frequent words become whole pieces, as in a real vocabulary.
    weights = [1.0 / (i + 1) for i in range(len(lexicon))]
    rng.shuffle(lexicon)
    n_sentences = max(500, vocab_size)
    out = []
    for _ in range(n_sentences):
        words = rng.choices(lexicon, weights=weights, k=rng.randint(4, 14))
        # A fresh uniform draw keeps the rare tail of the lexicon in the corpus.
        words.append(rng.choice(lexicon))
        out.append(" ".join(words))
    return out


def train_random_tokenizer(path: str | Path, vocab_size: int, seed: int = 0) -> Path:
    """Train a SentencePiece model of exactly ``vocab_size`` pieces on a synthetic corpus and write it to ``path``.

    Special ids: unk 0, bos 1, eos 2, pad 3. Deterministic for a given ``(vocab_size, seed)``.
    """
    if vocab_size < 8:
        raise ValueError(f"vocab_size must be >= 8, got {vocab_size}")
    path = Path(path)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(random_corpus(vocab_size, seed)), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, character_coverage=1.0,
        minloglevel=2, num_threads=1, hard_vocab_limit=True, byte_fallback=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


MAX_MODEL_BYTES = 64 << 20  # a SentencePiece model of 256k pieces is ~5 MiB


class Tokenizer:
    """A loaded SentencePiece model."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: tokenizer file not found")
        size = self.path.stat().st_size
        if size > MAX_MODEL_BYTES:  # SentencePiece would read it all first (a 5 GB weights file named by mistake)
            raise TokenizerError(f"{self.path}: {size / 2**20:.0f} MiB is not a SentencePiece model (those are a few "
                                 "MiB; is this a weights file?)")
        sp = spm.SentencePieceProcessor()
        try:
            ok = sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a valid SentencePiece model ({e})") from None
        if not ok:
            raise TokenizerError(f"{self.path}: not a valid SentencePiece model")
        self.sp = sp

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.Encode(text, out_type=int))

    def encode_pieces(self, text: str) -> list[str]:
        return list(self.sp.Encode(text, out_type=str))

    def decode(self, ids: list[int]) -> str:
        return self.sp.Decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"{self.path}: token id {i} out of range [0, {self.vocab_size})")
        return self.sp.IdToPiece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self.sp.PieceToId(piece)

