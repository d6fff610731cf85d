"""Tokenizers for the language-model family, and the one a run carries in RUN/shared/.

Where a run's tokenizer comes from (`model.tokenizer` in the recipe):
- a path to a SentencePiece `.model` or a `tokenizers` `.json` file: copied into the run;
- unset, with a checkpoint: the checkpoint folder's own `tokenizer.json` or `tokenizer.model`;
- unset, without a checkpoint: a byte-level BPE with the model's vocabulary size, trained on the
  recipe's training text and saved as RUN/shared/tokenizer.json; or, with `model.tokenizer_type=char`,
  a character-level tokenizer: one id per character of the training text (sorted), then EOS
  (text8 and bits per character are character-level). Characters it has not seen are dropped.
- a checkpoint folder without a tokenizer is refused (its embeddings belong to its own tokens)
  unless `model.tokenizer` names one or `model.train_tokenizer=true` asks for a new BPE anyway.

Special tokens follow the checkpoint, and are stored beside the tokenizer as
RUN/shared/tokenizer_settings.json, so training data and sampling prompts agree:
- BOS: added in front of every document and prompt exactly when the checkpoint's tokenizer adds
  it by default: `add_bos_token` of its tokenizer_config.json when present, else what the
  tokenizers post-processor of tokenizer.json does, else (SentencePiece) whenever the model has a
  BOS piece, as transformers' LlamaTokenizer does.
- EOS: the document separator is the tokenizer_config.json `eos_token` (else the config's first
  `eos_token_id`); generation stops on ANY id of config.json's and generation_config.json's
  `eos_token_id` (an int or a list: Llama-3 Instruct's `<|eot_id|>` included).
Runs without the settings file (older runs, trained BPEs) add no BOS and stop on the EOS token.

Sampling reads only the copy inside the run, so a run needs nothing else to generate text.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dbconvert.errors import DbconvertError, first_line

FILENAMES = ("tokenizer.json", "tokenizer.model")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
BPE_EOS = "<|endoftext|>"
SETTINGS_FILE = "tokenizer_settings.json"


@dataclass(frozen=True)
class TokenizerSettings:
    """How the run's tokenizer is used: BOS in front of documents and prompts or not, and the EOS ids."""

    add_bos: bool = False
    bos_id: int | None = None
    eos_id: int | None = None
    """The document separator of packed training data (and where an empty prompt starts without BOS)."""
    stop_ids: tuple[int, ...] = ()
    """Generation stops at any of these."""
    origin: str = ""
    """Where the choices came from (for the user reading the run)."""


class TokenizerError(DbconvertError):
    """A tokenizer that is missing, unreadable, or does not fit the model."""


class Tokenizer:
    """One interface over `tokenizers` JSON files and SentencePiece models."""

    def __init__(self, path: Path, settings: TokenizerSettings | None = None) -> None:
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
                raise TokenizerError(
                    f"tokenizer {self.path} is neither a SentencePiece .model nor a tokenizers .json file"
                )
        except TokenizerError:
            raise
        except Exception as exc:
            raise TokenizerError(f"cannot read tokenizer {self.path} ({first_line(exc, 120)})") from None
        self.settings = settings or TokenizerSettings(
            eos_id=self.eos_id, stop_ids=(() if self.eos_id is None else (self.eos_id,))
        )
        self.eos_id = self.settings.eos_id
        self.bos_id = self.settings.bos_id if self.settings.add_bos else None
        self.stop_ids = self.settings.stop_ids

    def encode(self, text: str) -> list[int]:
        """The ids of one document or prompt, BOS first when the run's tokenizer adds it."""
        if self._sp is not None:
            return self._with_bos(list(self._sp.encode(text)))
        return self._with_bos(list(self._hf.encode(text, add_special_tokens=False).ids))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._sp is not None:
            return [self._with_bos(list(ids)) for ids in self._sp.encode(texts)]
        return [self._with_bos(list(e.ids)) for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def _with_bos(self, ids: list[int]) -> list[int]:
        return [self.bos_id, *ids] if self.bos_id is not None else ids

    def token_id(self, token: str) -> int | None:
        """The id of a token string (None when the vocabulary lacks it)."""
        if self._sp is not None:
            i = int(self._sp.piece_to_id(token))
            return i if i != self._sp.unk_id() or token == self._sp.id_to_piece(i) else None
        return self._hf.token_to_id(token)

    def character_level(self) -> bool:
        """True when every ordinary token is one character (`model.tokenizer_type: char`): bits per token are
        then bits per character."""
        if self._hf is None:
            return False
        special = {t.content for t in self._hf.get_added_tokens_decoder().values()}
        return all(len(t) == 1 for t in self._hf.get_vocab(with_added_tokens=True) if t not in special)

    def default_bos(self) -> tuple[bool, int | None]:
        """(adds BOS by default, BOS id) as the file alone says: the tokenizers post-processor, or SentencePiece's
        BOS."""
        if self._sp is not None:
            bos = int(self._sp.bos_id())
            return bos >= 0, bos if bos >= 0 else None
        plain = self._hf.encode("a", add_special_tokens=False).ids
        full = self._hf.encode("a", add_special_tokens=True).ids
        if len(full) > len(plain) and full[1 : 1 + len(plain)] == plain:
            return True, full[0]
        return False, None

    def lost_characters(self, text: str, ids: list[int]) -> str:
        """The characters of `text` that its ids do not give back, sorted: a character-level vocabulary drops the
        characters its training text lacked, SentencePiece turns them into its unknown piece (whitespace, which
        tokenizers normalise, is not counted)."""
        back = self.decode(ids)
        return "".join(sorted({c for c in text if c not in back and not c.isspace()}))

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
                return cut, whole[len(cut) :]
        common = next((i for i, (a, b) in enumerate(zip(whole, head)) if a != b), min(len(whole), len(head)))
        return whole[:common], whole[common:]

    def decode_continuation(self, prefix: list[int], ids: list[int]) -> str:
        """The text `ids` add after `prefix` (see `split_decode`): what a completion or a true continuation reads."""
        return self.split_decode(prefix, ids)[1]

    def check_vocab(self, model_vocab: int, fixed_by: str | None = None) -> None:
        """Every token id must have an embedding row.

        `fixed_by` names what fixed the vocabulary (a checkpoint's config.json): then model.vocab_size
        cannot be changed, and the hint says to use the checkpoint's own tokenizer instead.
        """
        if self.vocab_size > model_vocab:
            fix = (
                f"the vocabulary size comes from {fixed_by}, so this tokenizer does not belong to the checkpoint; "
                "use the checkpoint's own tokenizer"
                if fixed_by
                else f"use a matching tokenizer or set model.vocab_size >= {self.vocab_size}"
            )
            raise TokenizerError(
                f"tokenizer {self.path.name} has {self.vocab_size} tokens but the model's vocabulary has "
                f"{model_vocab} rows; {fix}"
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


def train_chars(texts: Iterable[str], out: Path) -> Path:
    """A character-level tokenizer: one id per distinct character of `texts` (sorted), then the EOS token.

    A `tokenizers` BPE with no merges over that alphabet, so it is an ordinary tokenizer.json file
    that every reader of a run (`Tokenizer`, export) already takes; decoding joins the characters.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    chars = sorted(set().union(*(set(t) for t in texts)))
    if not chars:
        raise TokenizerError("the training text has no characters to build a character-level tokenizer from")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab[BPE_EOS] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens([BPE_EOS])
    tok.decoder = decoders.Fuse()
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
    """The tokenizer a run carries, with the run's settings (BOS, EOS) when it has them."""
    settings = read_settings(shared_dir)
    for name in FILENAMES:
        if (shared_dir / name).is_file():
            return Tokenizer(shared_dir / name, settings)
    raise TokenizerError(f"the run has no tokenizer in {shared_dir}; split it again")


# --- the run's tokenizer settings ------------------------------------------------------------


def read_settings(shared_dir: Path) -> TokenizerSettings | None:
    path = shared_dir / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        return TokenizerSettings(**{**raw, "stop_ids": tuple(raw.get("stop_ids", ()))})
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
        raise TokenizerError(f"{path} is damaged; split the run again") from None


def write_settings(shared_dir: Path, settings: TokenizerSettings) -> None:
    from dbconvert.checkpoint import atomic_write_text

    atomic_write_text(
        shared_dir / SETTINGS_FILE,
        json.dumps({**asdict(settings), "stop_ids": list(settings.stop_ids)}, indent=2) + "\n",
    )


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file as a dict ({} when absent); a damaged one is a one-line error."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TokenizerError(f"{path} is not valid JSON; restore it") from None
    return data if isinstance(data, dict) else {}


def id_list(value: Any) -> list[int]:
    """`eos_token_id` as a list: config files hold an int, a list of ints, or null."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def checkpoint_settings(tok: Tokenizer, tokenizer_dir: Path, model_dir: Path | None) -> TokenizerSettings:
    """BOS and EOS of a checkpoint's tokenizer (see the module docstring): tokenizer_config.json beside the
    tokenizer file, config.json and generation_config.json of the model folder."""
    tok_cfg = read_json(tokenizer_dir / "tokenizer_config.json")
    model_cfg = read_json(model_dir / "config.json") if model_dir else {}
    gen_cfg = read_json(model_dir / "generation_config.json") if model_dir else {}
    add_bos, bos_id = tok.default_bos()
    origin = ["BOS from the tokenizer's post-processor" if tok.path.suffix == ".json" else "BOS as SentencePiece's"]
    if (name := token_content(tok_cfg.get("bos_token"))) is not None and (i := tok.token_id(name)) is not None:
        bos_id = i
    elif bos_id is None:
        bos_id = next(iter(id_list(model_cfg.get("bos_token_id"))), None)
    if isinstance(tok_cfg.get("add_bos_token"), bool):
        add_bos, origin = tok_cfg["add_bos_token"], ["BOS from tokenizer_config.json add_bos_token"]
    if add_bos and bos_id is None:
        raise TokenizerError(
            f"the tokenizer in {tokenizer_dir} adds a BOS token but names none; fix its tokenizer_config.json"
        )
    config_eos = id_list(model_cfg.get("eos_token_id")) + id_list(gen_cfg.get("eos_token_id"))
    eos_id = tok.eos_id
    if (name := token_content(tok_cfg.get("eos_token"))) is not None and (i := tok.token_id(name)) is not None:
        eos_id = i
    elif config_eos:
        eos_id = config_eos[0]
    stops = tuple(dict.fromkeys([*config_eos, *([eos_id] if eos_id is not None else [])]))
    origin.append("EOS ids from config.json / generation_config.json" if config_eos else "EOS from the tokenizer")
    return TokenizerSettings(add_bos=add_bos, bos_id=bos_id, eos_id=eos_id, stop_ids=stops, origin="; ".join(origin))


def prepare_run_tokenizer(
    shared_dir: Path,
    tokenizer: str | None,
    checkpoint: str | None,
    train: bool,
    documents: Callable[[], Iterable[str]],
    vocab_size: int,
    kind: str = "bpe",
) -> Tokenizer:
    """Put the run's tokenizer and its settings into RUN/shared/ (see the module docstring for the choices).

    `documents` is only called when a tokenizer is trained (`kind`: a byte-level `bpe` or `char`acters). A checkpoint
    folder without a tokenizer is an error unless `train` (model.train_tokenizer) says a new BPE is really wanted.
    """
    model_dir = Path(checkpoint).expanduser() if checkpoint else None
    if tokenizer:
        path = Path(tokenizer).expanduser()
        if not path.is_file():
            raise TokenizerError(
                f"model.tokenizer {tokenizer} not found; give a SentencePiece .model or tokenizers .json file "
                "(e.g. Llama-2's tokenizer.model), or unset it to train a BPE on the data"
            )
        installed = Tokenizer(install(path, shared_dir))
        settings = checkpoint_settings(installed, path.parent, model_dir)
    elif model_dir is not None and (found := checkpoint_tokenizer(model_dir)):
        installed = Tokenizer(install(found, shared_dir))
        settings = checkpoint_settings(installed, model_dir, model_dir)
    elif model_dir is not None and not train:
        raise TokenizerError(
            f"checkpoint folder {model_dir} has no tokenizer ({' or '.join(FILENAMES)}), and its embeddings only mean "
            "something with its own tokens; copy the tokenizer there, set model.tokenizer=PATH, or set "
            "model.train_tokenizer=true to train a new BPE on the data anyway"
        )
    elif kind == "char":
        installed = Tokenizer(train_chars(documents(), shared_dir / "tokenizer.json"))
        settings = TokenizerSettings(
            eos_id=installed.eos_id,
            stop_ids=(installed.eos_id,),
            origin="a character-level tokenizer of the data's characters: no BOS, EOS " + BPE_EOS,
        )
    else:
        installed = Tokenizer(train_bpe(documents(), vocab_size, shared_dir / "tokenizer.json"))
        settings = TokenizerSettings(
            eos_id=installed.eos_id,
            stop_ids=(installed.eos_id,) if installed.eos_id is not None else (),
            origin="a byte-level BPE trained on the data: no BOS, EOS " + BPE_EOS,
        )
    write_settings(shared_dir, settings)
    return run_tokenizer(shared_dir)


def save_pretrained_tokenizer(shared_dir: Path, out: Path) -> list[Path]:
    """The run's tokenizer as a transformers folder that `AutoTokenizer.from_pretrained(out)` loads back with the
    run's behaviour: BOS added exactly when the run adds it, the run's BOS and EOS tokens.

    A tokenizers `.json` is saved through `PreTrainedTokenizerFast` with its post-processor set to the run's BOS
    choice; a SentencePiece `.model` is copied with a LlamaTokenizer tokenizer_config.json (`add_bos_token`).
    """
    tok = run_tokenizer(shared_dir)
    settings = tok.settings
    out.mkdir(parents=True, exist_ok=True)
    if tok._sp is not None:

        def piece(i: int | None) -> str | None:
            return None if i is None else str(tok._sp.id_to_piece(i))

        shutil.copyfile(tok.path, out / "tokenizer.model")
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": settings.add_bos,
            "add_eos_token": False,
            "bos_token": piece(settings.bos_id),
            "eos_token": piece(settings.eos_id),
            "unk_token": piece(int(tok._sp.unk_id())),
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return [out / "tokenizer.model", out / "tokenizer_config.json"]
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    raw = HFTokenizer.from_file(str(tok.path))
    adds, bos = tok.default_bos()
    if settings.add_bos and (not adds or bos != settings.bos_id):
        name = raw.id_to_token(settings.bos_id)
        raw.post_processor = processors.TemplateProcessing(
            single=f"{name} $A", pair=f"{name} $A {name} $B", special_tokens=[(name, settings.bos_id)]
        )
    elif not settings.add_bos and adds:
        raw.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    special = {
        key: raw.id_to_token(i)
        for key, i in (("bos_token", settings.bos_id), ("eos_token", settings.eos_id))
        if i is not None
    }
    PreTrainedTokenizerFast(tokenizer_object=raw, **special).save_pretrained(str(out))
    return [out / "tokenizer.json", out / "tokenizer_config.json"]
