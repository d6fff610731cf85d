"""Tokenizers for the language-model family, and the one a run carries in RUN/shared/.

Where a run's tokenizer comes from (`model.tokenizer` in the recipe):
- a path to a SentencePiece `.model` or a `tokenizers` `.json` file: copied into the run;
- unset, with a checkpoint: the checkpoint folder's own `tokenizer.json` or `tokenizer.model`;
- unset, without one (or a checkpoint without a tokenizer): a byte-level BPE with the model's
  vocabulary size, trained on the recipe's training text and saved as RUN/shared/tokenizer.json.

Sampling reads only the copy inside the run, so a run needs nothing else to generate text.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from dbconvert.errors import DbconvertError, first_line

FILENAMES = ("tokenizer.json", "tokenizer.model")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
BPE_EOS = "<|endoftext|>"


class TokenizerError(DbconvertError):
    """A tokenizer that is missing, unreadable, or does not fit the model."""


class Tokenizer:
    """One interface over `tokenizers` JSON files and SentencePiece models."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer file {self.path} not found; set model.tokenizer to a .model or .json file")
        try:
            if self.path.suffix == ".json":
                from tokenizers import Tokenizer as HFTokenizer

                self._hf = HFTokenizer.from_file(str(self.path))
                self._sp = None
                self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
                self.eos_id = next((i for t in EOS_CANDIDATES if (i := self._hf.token_to_id(t)) is not None), None)
            elif self.path.suffix == ".model":
                import sentencepiece as spm

                self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
                self._hf = None
                self.vocab_size = int(self._sp.get_piece_size())
                eos = int(self._sp.eos_id())
                self.eos_id = eos if eos >= 0 else None
            else:
                raise TokenizerError(f"tokenizer {self.path} is neither a SentencePiece .model nor a tokenizers .json file")
        except TokenizerError:
            raise
        except Exception as exc:
            raise TokenizerError(f"cannot read tokenizer {self.path} ({first_line(exc, 120)})") from None

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return list(self._sp.encode(text))
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._sp is not None:
            return [list(ids) for ids in self._sp.encode(texts)]
        return [list(e.ids) for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        if self._sp is not None:
            return str(self._sp.decode(ids))
        return str(self._hf.decode(ids, skip_special_tokens=True))

    def split_decode(self, prefix: list[int], ids: list[int]) -> tuple[str, str]:
        """(text of `prefix`, text that `ids` add after it), decoded as ONE sequence: the two parts join to
        `decode(prefix + ids)`.

        Decoding the pieces apart is wrong: a byte-level BPE character split between the two becomes U+FFFD
        on both sides, and SentencePiece drops the leading space of a piece that starts a decode. So the
        whole sequence is decoded and the prefix's text stripped from its front; a prefix that ends inside
        a character (its decode ends in U+FFFD) gives that character to the continuation.
        """
        whole = self.decode([*prefix, *ids])
        head = self.decode(list(prefix))
        for cut in (head, head.rstrip("\ufffd")):
            if whole.startswith(cut):
                return cut, whole[len(cut):]
        common = next((i for i, (a, b) in enumerate(zip(whole, head)) if a != b), min(len(whole), len(head)))
        return whole[:common], whole[common:]

    def decode_continuation(self, prefix: list[int], ids: list[int]) -> str:
        """The text `ids` add after `prefix` (see `split_decode`): what a completion or a true continuation reads."""
        return self.split_decode(prefix, ids)[1]

    def check_vocab(self, model_vocab: int) -> None:
        """Every token id must have an embedding row."""
        if self.vocab_size > model_vocab:
            raise TokenizerError(
                f"tokenizer {self.path.name} has {self.vocab_size} tokens but the model's vocabulary has "
                f"{model_vocab} rows; use a matching tokenizer or set model.vocab_size >= {self.vocab_size}"
            )


def train_bpe(texts: Iterable[str], vocab_size: int, out: Path) -> Path:
    """A byte-level BPE of `vocab_size` tokens (incl. the EOS token) trained on `texts`, saved to `out`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise TokenizerError(
            f"a byte-level BPE needs model.vocab_size >= {len(alphabet) + 1} (256 bytes + EOS), got {vocab_size}"
        )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BPE_EOS], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out


def checkpoint_tokenizer(checkpoint_dir: Path) -> Path | None:
    """The tokenizer file that sits in a Hugging Face checkpoint folder, if any (JSON preferred)."""
    for name in FILENAMES:
        if (checkpoint_dir / name).is_file():
            return checkpoint_dir / name
    return None


def install(src: Path, shared_dir: Path) -> Path:
    """Copy a tokenizer file into the run as shared/tokenizer.json or shared/tokenizer.model."""
    Tokenizer(src)  # fail early on an unreadable file
    dst = shared_dir / ("tokenizer.json" if src.suffix == ".json" else "tokenizer.model")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def run_tokenizer(shared_dir: Path) -> Tokenizer:
    """The tokenizer a run carries."""
    for name in FILENAMES:
        if (shared_dir / name).is_file():
            return Tokenizer(shared_dir / name)
    raise TokenizerError(f"the run has no tokenizer in {shared_dir}; split it again")
