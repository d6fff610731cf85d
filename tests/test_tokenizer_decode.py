"""Decoding text in pieces: characters split between tokens and word boundaries come out right (issue 14.8)."""

from __future__ import annotations

from pathlib import Path

from dbconvert.tokenizer import Tokenizer, train_bpe

TEXT = "café crème brûlée, naïve façade: déjà vu à Noël"


def test_split_decode_of_a_byte_level_bpe_keeps_accents_and_spaces(tmp_path: Path) -> None:
    # 257 tokens = the 256 bytes + EOS, no merges: every accented letter is two tokens
    tok = Tokenizer(train_bpe([TEXT] * 20, 257, tmp_path / "bytes.json"))
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and len(ids) > len(TEXT)
    split_inside = [k for k in range(1, len(ids)) if "\ufffd" in tok.decode(ids[:k])]
    assert split_inside  # decoding the prompt alone does cut characters in two
    for k in range(len(ids) + 1):
        head, tail = tok.split_decode(ids[:k], ids[k:])
        assert head + tail == TEXT and "\ufffd" not in head + tail, k
    k = split_inside[0]  # "caf" + the first byte of "é"
    assert tok.split_decode(ids[:k], ids[k:]) == ("caf", TEXT[3:])
    assert tok.decode(ids)[len(tok.decode(ids[:k])) :] == TEXT[4:]  # the old way lost the "é"
    space = ids.index(tok.encode(" ")[0])
    assert tok.decode_continuation(ids[:space], ids[space:]).startswith(" crème")  # the word boundary is kept


def test_split_decode_with_merged_tokens(tmp_path: Path) -> None:
    tok = Tokenizer(train_bpe([TEXT] * 20, 300, tmp_path / "bpe.json"))
    ids = tok.encode(TEXT)
    for k in range(len(ids) + 1):
        head, tail = tok.split_decode(ids[:k], ids[k:])
        assert head + tail == TEXT and (k == 0 or tail == "" or tail.startswith((" ", ",", ":")))
