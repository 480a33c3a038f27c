"""Tokenizers built locally (a CLIP BPE vocabulary of whole words, a T5 tokenizer) for the tiny pipelines."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

_CLIP_MAX_LEN = 77  # as the real CLIP tokenizers
_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_WORDS = (  # whole-word tokens of both tokenizers (so common prompt words are one token)
    "a an the of and with in on at to photo picture painting video image red green blue yellow black "
    "white circle square triangle cat dog bird car tree house man woman sky sea mountain city night day"
).split()
_T5_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()\"&/"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (lowest rank first) to one word's symbols."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


_clip_dir: Path | None = None


def write_clip_vocab(folder: Path, words: Iterable[str]) -> Path:
    """Write a CLIP ``vocab.json`` and ``merges.txt`` into ``folder`` (load with ``CLIPTokenizer.from_pretrained``).

    Byte-level BPE: every byte is a token (so any text encodes), and each of ``words`` is merged into a single
    ``word</w>`` token.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Split the word with the merges so far, then append merges that join those pieces left to
        # right. Appended merges rank last, so words handled earlier keep their single token.
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks.setdefault((pieces[0], pieces[1]), len(ranks))
            tokens.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab[_CLIP_BOS] = len(vocab)
    vocab[_CLIP_EOS] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = "".join(f"{a} {b}\n" for a, b in ranks)  # dicts keep insertion (= rank) order
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    return folder


def _clip_tokenizer_dir() -> Path:
    """A per-process temp folder with the tiny models' CLIP vocabulary (common prompt words are one token)."""
    global _clip_dir
    if _clip_dir is not None and (_clip_dir / "merges.txt").is_file():
        return _clip_dir
    folder = Path(tempfile.mkdtemp(prefix="diffattn-tiny-tok-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    _clip_dir = write_clip_vocab(folder, _WORDS)
    return folder


def _clip_tokenizer(pad_token: str = _CLIP_EOS) -> Any:
    """Byte-level CLIP tokenizer (common words are single tokens), model_max_length 77."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(
        str(_clip_tokenizer_dir()), model_max_length=_CLIP_MAX_LEN, pad_token=pad_token
    )


def _clip_ids(tokenizer: Any) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _t5_tokenizer() -> Any:
    """T5-like fast tokenizer: whitespace/punctuation split, WordPiece over a few words + characters.

    Ids: <pad>=0, </s>=1, <unk>=2 (as in T5); every encoded text ends with </s>.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    tokens = ["<pad>", "</s>", "<unk>"] + list(_WORDS)
    tokens += [c for c in _T5_CHARS if c not in tokens] + ["##" + c for c in _T5_CHARS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = Tokenizer(WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=64))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
        padding_side="right",
    )


# --------------------------------------------------------------------------------------------------
# Text encoders and VAEs
# --------------------------------------------------------------------------------------------------
