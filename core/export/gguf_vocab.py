"""A checkpoint's tokenizer as llama.cpp's GGUF vocabulary, for core.export.gguf_convert:
what llama.cpp's convert_hf_to_gguf.py writes, with gguf-py's keys and SpecialVocab.

The tokenizer read is the one transformers loads for the checkpoint, which is what the
run tokenized with: transformers rebuilds some families' from the files (Qwen2's class
splits with Qwen2's regex and NFC whatever tokenizer.json says; Llama's makes its
normalization a Metaspace; a tokenizer.model of a family without a tokenizer class, as
Mistral's and Phi-3's, is built generically), so that one is read, not the files. Two kinds:

- Byte-level BPE -> `tokenizer.ggml.model` "gpt2": tokens by id, merges, and
  `tokenizer.ggml.pre` from the pre-tokenizer: the regex it splits with is the one
  llama.cpp's pre type applies (llama-bpe, qwen2, tekken, smollm, gpt-2).
- SentencePiece BPE (tokenizer.model, or a tokenizer.json BPE with byte fallback: Llama 2,
  Mistral v0.1-v0.3, Gemma, Phi-3) -> "llama", llama.cpp's SentencePiece tokenizer: tokens,
  scores, token types (byte tokens BYTE, the unknown token UNKNOWN), `add_space_prefix`.
  It merges the adjacent pair whose joined piece scores highest, where Hugging Face's BPE
  applies its lowest-ranked merge: the scores are tokenizer.model's (as llama.cpp's
  converter writes them) or, from a tokenizer.json alone, minus the rank of the first
  merge giving each token (llama.cpp's converter writes -1000 for all, which merges by
  position instead). Accepted where llama.cpp's normalization is the tokenizer's: spaces
  as "▁" and at most one prefixed (see _spm_form). Two differences stay, llama.cpp's own,
  around text the calibration rarely holds: after an added or user-defined token in the
  text llama.cpp prefixes a space again (SentencePiece and transformers do not), and to a
  text starting with a space it prefixes one as SentencePiece does, where transformers'
  Llama class (a Metaspace) does not.

Both: added tokens special (or looking special, as <|im_start|>) are control tokens,
others user-defined (with SentencePiece, "▁" in them as a space: llama.cpp matches them in
the raw text), as are the user-defined pieces a tokenizer splits off; ids the vocabulary
leaves free are [PAD<id>], unused; special ids and add_bos/add_eos as the Hugging Face
tokenizer actually adds them; the chat template. Anything else (Unigram, WordPiece,
normalizers llama.cpp does not apply, pre-tokenizers it has no type for) is refused,
naming what the tokenizer is; so is a vocabulary llama.cpp would not load (a model named
like Phi-3 without Phi-3's tokens, which llama.cpp looks up by that name).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError

# The pre-tokenizer regexes of the tokenizer.json files llama.cpp's pre types stand for
# (the regex each type applies is in llama.cpp's src/llama-vocab.cpp).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
           r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
          r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
           r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2", _TEKKEN: "tekken"}
SPACE = "▁"                     # SentencePiece's space
ADDED_SCORE = -1000.0           # what llama.cpp's converter gives added tokens
_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# llama.cpp gives a model whose name says Phi-3 Phi-3's token attributes, looking these up
# (a vocabulary without them does not load)
_PHI3_NAMES, _PHI3_TOKENS = ("phi-3", "phi3"), ("</s>", "<unk>", "<s>", "<|endoftext|>")


@dataclass
class Vocab:
    tokenizer: object        # what transformers loads for the checkpoint
    spec: dict               # its tokenizer.json
    model: str               # llama.cpp's tokenizer model: "gpt2" or "llama"
    pre: str                 # tokenizer.ggml.pre
    space_prefix: bool = False
    user_defined: list[str] = field(default_factory=list)   # pieces kept whole, not added tokens
    scores: dict[int, float] = field(default_factory=dict)  # by id, added tokens aside


def read(folder: Path, hint: Callable[[Path], str]) -> Vocab:
    """The checkpoint's tokenizer and how llama.cpp reproduces it, or a refusal naming what
    the tokenizer is (`hint`: what to do instead)."""
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise UserError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model). {hint(folder)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        model = spec["model"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise UserError(f"cannot read the tokenizer of {folder} ({type(exc).__name__}: "
                        f"{str(exc)[:200]}). {hint(folder)}") from None
    what = f"the tokenizer transformers loads for {folder} ({type(tokenizer).__name__})"
    tokens = tokenizer.get_vocab()
    if any(n in folder.name.lower() for n in _PHI3_NAMES) and (
            missing := [t for t in _PHI3_TOKENS if t not in tokens]):
        raise UserError(f"llama.cpp takes a model named {folder.name!r} for Phi-3 and looks up "
                        f"Phi-3's tokens {missing}, which {what} lacks: it would not load the "
                        "file. Convert it from a folder whose name does not say phi-3 or phi3.")
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        form = _spm_form(spec)
        if form is None:
            raise UserError(
                f"{what} is a SentencePiece-style BPE whose normalization (normalizer "
                f"{json.dumps(spec.get('normalizer'))[:160]}, pre-tokenizer "
                f"{json.dumps(spec.get('pre_tokenizer'))[:160]}) is not the one llama.cpp's "
                f"SentencePiece tokenizer applies (spaces as {SPACE}, at most one prefixed). "
                f"{hint(folder)}")
        prefix, user = form
        if missing := [piece for piece in user if piece not in tokens]:
            raise UserError(f"{what} splits off {missing[:3]}, which are not tokens of its "
                            f"vocabulary. {hint(folder)}")
        return Vocab(tokenizer, spec, "llama", "default", prefix, user, _scores(tokenizer, spec, folder))
    decoder = (spec.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        raise UserError(f"impq-tui converts byte-level and SentencePiece BPE tokenizers to GGUF, "
                        f"and {what} is a {model.get('type')} model with a {decoder} decoder. "
                        f"{hint(folder)}")
    pre = _pre_type(spec)
    if pre is None:
        normalizer = (spec.get("normalizer") or {}).get("type")
        raise UserError(f"the pre-tokenizer of {what} "
                        f"({json.dumps(spec.get('pre_tokenizer'))[:200]}"
                        f"{f', normalizer {normalizer}' if normalizer else ''}) is not one impq-tui "
                        f"knows llama.cpp's type for. {hint(folder)}")
    return Vocab(tokenizer, spec, "gpt2", pre)


def _pre_type(spec: dict) -> str | None:
    """llama.cpp's pre type for a byte-level BPE: the one whose regex the tokenizer splits with."""
    if (spec.get("normalizer") or {}).get("type") not in (None, "NFC"):
        return None
    steps = _steps(spec.get("pre_tokenizer") or {})
    if steps == [("ByteLevel", True, False)]:
        return "gpt-2"
    if steps == [("Digits", True), ("ByteLevel", True, False)]:
        return "smollm"
    if len(steps) == 2 and steps[0][0] == "Split" and steps[1] == ("ByteLevel", False, False):
        return SPLIT_PRE.get(steps[0][1]) if steps[0][2:] == ("Isolated", False) else None
    return None


def _steps(pre: dict) -> list[tuple]:
    if pre.get("type") == "Sequence":
        return [s for p in pre.get("pretokenizers", []) for s in _steps(p)]
    if pre.get("type") == "ByteLevel":
        return [("ByteLevel", bool(pre.get("use_regex", True)), bool(pre.get("add_prefix_space")))]
    if pre.get("type") == "Digits":
        return [("Digits", bool(pre.get("individual_digits")))]
    if pre.get("type") == "Split":
        pattern = pre.get("pattern") or {}
        return [("Split", pattern.get("Regex", pattern.get("String")), pre.get("behavior"),
                 bool(pre.get("invert")))]
    return [(pre.get("type"),)]


def _spm_form(spec: dict) -> tuple[bool, list[str]] | None:
    """(whether a space is prefixed, the user-defined pieces kept whole) where llama.cpp's
    SentencePiece tokenizer normalizes as this SentencePiece-style tokenizer does (spaces
    become "▁", at most one prefixed, nothing else changes); else None. The forms: a
    Metaspace that does not split (Llama and Mistral as transformers builds them);
    Replace(" ", "▁") after an optional Prepend("▁") (Llama 2's tokenizer.json; Gemma's,
    whose split on " " finds no space left); transformers' build from a tokenizer.model
    for families without a tokenizer class of their own (Phi-3's): Replace, then a leading
    "▁" doubled for the Metaspace that prefixes one, then its user-defined pieces split off."""
    def flat(step: dict | None, key: str) -> list[dict]:
        step = step or {}
        return list(step.get(key) or []) if step.get("type") == "Sequence" else [step] if step else []

    norms, pres = flat(spec.get("normalizer"), "normalizers"), flat(spec.get("pre_tokenizer"), "pretokenizers")
    spaces = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    doubled = {"type": "Replace", "pattern": {"Regex": rf"\A{SPACE}"}, "content": SPACE * 2}
    user: list[str] = []
    last = pres[-1] if pres else {}
    if last.get("type") == "Split" and not last.get("invert") and last.get("behavior") == "Isolated" \
            and "Regex" in (last.get("pattern") or {}):
        user = [re.sub(r"\\(.)", r"\1", piece) for piece in re.split(r"(?<!\\)\|", last["pattern"]["Regex"])]
        pres = pres[:-1]
    elif last.get("type") == "Split" and (last.get("pattern") or {}).get("String") == " " \
            and not last.get("invert") and spaces in norms:
        pres = pres[:-1]        # Gemma's: no space is left after the Replace
    metaspace = None
    if pres:
        step = pres[0]
        if len(pres) > 1 or step.get("type") != "Metaspace" or step.get("replacement") != SPACE \
                or step.get("split", True):
            return None
        metaspace = step.get("prepend_scheme", "always") != "never"
    if norms in ([], [spaces]) and metaspace is not None:
        return metaspace, user
    if norms == [spaces] and metaspace is None:
        return False, user
    if norms == [{"type": "Prepend", "prepend": SPACE}, spaces] and metaspace in (None, True):
        return True, user
    if norms == [spaces, doubled] and metaspace:
        return True, user
    return None


def _looks_special(text: str) -> bool:
    """Added tokens some tokenizers do not flag special although they are (<|im_start|>)."""
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def write(writer, vocab: Vocab, folder: Path, n_vocab: int) -> None:
    """The vocabulary into the GGUF `writer`: `n_vocab` tokens (the model's embedding rows)."""
    import gguf

    tokenizer = vocab.tokenizer
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    # Added tokens past the model's embedding (transformers' Qwen2 class adds
    # <|endoftext|> to any vocabulary) can never reach the model: not in the file.
    beyond = sorted(i for i in by_id if i >= n_vocab)
    if any(i not in added for i in beyond):
        raise UserError(f"the tokenizer of {folder} has ids up to {beyond[-1]}, beyond the model's "
                        f"vocab_size {n_vocab}.")
    spm = vocab.model == "llama"
    unk, user_defined = tokenizer.unk_token_id, set(vocab.user_defined)
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = by_id[i]
        if i in added:
            special = added[i].special or _looks_special(text)
            if spm and not special:     # llama.cpp matches these in the raw text, before "▁"
                text = text.replace(SPACE, " ")
            types.append(gguf.TokenType.UNKNOWN if spm and i == unk else
                         gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif text in user_defined:
            types.append(gguf.TokenType.USER_DEFINED)
        elif spm and _BYTE.fullmatch(text):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(tokens)
    if spm:
        writer.add_token_scores([ADDED_SCORE if i in added else vocab.scores.get(i, 0.0)
                                 for i in range(n_vocab)])
        writer.add_add_space_prefix(vocab.space_prefix)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=not spm, n_vocab=n_vocab)
    # Special ids as transformers has them (a folder with tokenizer.model alone has no
    # tokenizer.json for SpecialVocab to read them from).
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None and token_id < n_vocab:
            special.special_token_ids[kind] = token_id
    # Whether BOS/EOS are added: as the Hugging Face tokenizer does it, not as its files
    # would be parsed (llama.cpp's default for a pre type is otherwise taken).
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special.add_special_token["bos"] = bool(bos is not None and ids and ids[0] == bos)
    special.add_special_token["eos"] = bool(eos is not None and ids and ids[-1] == eos and len(ids) > 1)
    if not special.chat_template and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def _scores(tokenizer, spec: dict, folder: Path) -> dict[int, float]:
    """Per token (added tokens aside), the score llama.cpp's SentencePiece tokenizer merges
    by, highest first: tokenizer.model's, which must hold the tokens transformers loads."""
    tokens = tokenizer.get_vocab()
    by_id = {i: t for t, i in tokens.items()}
    added = tokenizer.added_tokens_decoder
    sp_file = folder / "tokenizer.model"
    if sp_file.is_file():
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_file))
        scores = {}
        for i in range(sp.get_piece_size()):
            if i in added:
                continue
            if by_id.get(i) != sp.id_to_piece(i):
                raise UserError(f"{sp_file} and the tokenizer transformers loads for {folder} "
                                f"disagree on token {i} ({sp.id_to_piece(i)!r}, {by_id.get(i)!r}); "
                                "a GGUF of it would not tokenize as the run did. Remove the one "
                                "that is not the checkpoint's tokenizer.")
            scores[i] = sp.get_score(i)
        return scores
    # Hugging Face applies the lowest-ranked merge first: a token's score is minus the rank
    # of the first merge giving it; tokens no merge gives rank after all merges.
    merges = spec["model"]["merges"]
    rank: dict[int, int] = {}
    for r, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(tokens.get(left + right, -1), r)
    return {i: -float(rank.get(i, len(merges) + i)) for i in by_id if i not in added}
