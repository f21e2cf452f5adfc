"""The researcher's hand-written vocabulary: loading every supported file format, specials, and ids <-> text.

Formats, told apart by content (a file whose whole text parses as a JSON object or list is JSON, whatever its name,
as `json.dump(tokens, open("v.txt", "w"), indent=0)` writes it; a .json file must be JSON; anything else is text
lines, so a text vocabulary may start with "[PAD]"):
  * JSON object token -> id      {"<pad>": 0, "C4": 4, ...}
  * JSON object id -> token      {"0": "<pad>", "4": "C4", ...}
  * JSON list (index = id)       ["<pad>", "<s>", ...]
  * text, one token per line     (line 1 = id 0; every line counts, so an empty line is an error)
  * text, `token<TAB>id` lines   (used as soon as the first line has a TAB)

Errors name the file and line (duplicate token or id, non-integer id or one of 2**63 or more, empty token, a
token that is not valid Unicode). The JSON walker below exists because `json.load` silently keeps the last of two
duplicate keys and forgets line numbers.

Text is the vocabulary's token strings joined by a joiner (default one space); `text_to_ids` is its inverse.
`check_text_safe(joiner)`, which the conversions call, refuses every vocabulary and joiner for which that inverse
would not be exact (see there), and Llama-3 control-token strings in a token or the joiner (pretokenize.py would
encode them as control tokens).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .llama3 import CONTROL_TOKEN_RE, LONE_SURROGATE_RE, check_user_text

ROLES = ("pad", "bos", "eos", "sep", "unk")

# Spellings recognised without a flag. [CLS] opens BERT-style sequences, so it counts as bos.
DEFAULT_SPECIAL_NAMES = {
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<PAD>", "<|padding|>"),
    "bos": ("<s>", "<bos>", "[BOS]", "<|bos|>", "<BOS>", "[CLS]", "<|startoftext|>", "<start>", "[START]"),
    "eos": ("</s>", "<eos>", "[EOS]", "<|eos|>", "<EOS>", "<|endoftext|>", "<end>", "[END]"),
    "sep": ("<sep>", "[SEP]", "<|sep|>", "<SEP>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>", "<UNK>"),
}

# What each --ROLE-token flag means, shared by every script that loads the vocabulary.
SPECIAL_FLAG_HELP = {
    "pad": "padding, stripped wherever it stands",
    "bos": "begin of sequence, dropped",
    "eos": "end of sequence, dropped",
    "sep": "separator between prompt and response",
    "unk": "unknown token, used by text->ids for pieces outside the vocabulary",
}


def add_special_token_flags(parser, default: str = "found by common names") -> None:
    """Add --pad-token ... --unk-token to an argparse parser or group; `default` says where an absent flag's
    token comes from (data_processing.py and predict.py must agree on the meaning, not on the default)."""
    for role in ROLES:
        parser.add_argument(f"--{role}-token", default=None, metavar="T",
                            help=f"{SPECIAL_FLAG_HELP[role]}. Default: {default}; '' means the vocabulary has none")


def special_token_flags(args: argparse.Namespace) -> dict[str, str | None]:
    """The --ROLE-token values of parsed args, as load_hand_vocab's `specials`."""
    return {role: getattr(args, f"{role}_token") for role in ROLES}


# ids are 64-bit integers wherever they are stored (numpy, torch, the split hash of data_processing.py)
MAX_ID = 2**63 - 1


@dataclass(frozen=True)
class Specials:
    """Ids of the hand vocabulary's special tokens (None where the vocabulary has none).

    Attribute access (`specials.sep`) and mapping access (`specials["sep"]`, `.get`, `.items()`) both work.
    """

    pad: int | None = None
    bos: int | None = None
    eos: int | None = None
    sep: int | None = None
    unk: int | None = None

    def __getitem__(self, role: str) -> int | None:
        if role not in ROLES:
            raise KeyError(role)
        return getattr(self, role)

    def get(self, role: str, default=None):
        return getattr(self, role, default) if role in ROLES else default

    def items(self):
        return [(r, getattr(self, r)) for r in ROLES]

    def as_dict(self) -> dict[str, int | None]:
        return dict(self.items())


@dataclass
class HandVocab:
    path: str
    token_to_id: dict[str, int]
    id_to_token: dict[int, str]
    specials: Specials
    sha256: str  # of the id -> token mapping, so the same vocabulary in two file formats has the same hash
    file_sha256: str
    line_of: dict[int, int] = field(default_factory=dict, repr=False)  # id -> line in the file, for errors
    _safe_joiners: set = field(default_factory=set, repr=False)

    def __len__(self) -> int:
        return len(self.id_to_token)

    def special_names(self) -> dict[str, str | None]:
        return {r: (None if i is None else self.id_to_token[i]) for r, i in self.specials.items()}

    def with_specials(self, specials: dict[str, str | None] | None = None) -> HandVocab:
        """The same vocabulary with its specials chosen anew, as load_hand_vocab(path, specials) would."""
        # a fresh joiner cache: which tokens are exempt from the text check depends on the specials
        return dataclasses.replace(self, specials=_resolve_specials(self.path, self.token_to_id, specials or {}),
                                   _safe_joiners=set())

    def check_text_safe(self, joiner: str = " ") -> None:
        """Raise a one-line UserError unless ids -> text -> ids is exact with this joiner for every text token.

        text_to_ids splits a whitespace joiner's text at whitespace runs (to tolerate a model's spacing), so no
        token may hold whitespace; any other joiner's text at the leftmost occurrence of the joiner. That finds the
        joiner ids_to_text put after a token t unless t holds the joiner, or t ends with the first k characters of
        a joiner that repeats itself after k characters ("xa" + "aa" holds "aa" one character early, and reads
        back as "x", "a..."); those are all the ways it can fail. pad/bos/eos never reach the text (they are
        stripped), so they are exempt.
        """
        if joiner in self._safe_joiners:
            return
        if joiner == "":
            raise UserError("--joiner must not be empty: text could not be split back into hand tokens")
        check_user_text(f"--joiner {joiner!r}", joiner)
        exempt = {self.specials.pad, self.specials.bos, self.specials.eos}
        whitespace = joiner.isspace()
        early = [] if whitespace else [k for k in range(1, len(joiner)) if joiner[k:] == joiner[:-k]]
        for i, tok in self.id_to_token.items():
            if i in exempt:
                continue
            if (whitespace and any(c.isspace() for c in tok)) or (not whitespace and joiner in tok):
                what = "whitespace" if whitespace else f"the joiner {joiner!r}"
                raise UserError(f"{self.path}:{self.line_of.get(i, '?')}: token {tok!r} (id {i}) contains {what}, "
                                f"so text could not be split back into ids; choose another --joiner")
            for k in early:
                if tok.endswith(joiner[:k]):
                    raise UserError(f"{self.path}:{self.line_of.get(i, '?')}: token {tok!r} (id {i}) ends with "
                                    f"{joiner[:k]!r}, so in {tok + joiner!r} the joiner {joiner!r} is found {k} "
                                    f"character{'s' if k > 1 else ''} early and text would not read back as the same "
                                    f"ids; choose another --joiner")
            m = CONTROL_TOKEN_RE.search(tok)
            if m:
                raise UserError(f"{self.path}:{self.line_of.get(i, '?')}: token {tok!r} (id {i}) contains the "
                                f"Llama-3 control token {m.group(0)}; rename it in the vocabulary")
        self._safe_joiners.add(joiner)

    def ids_to_text(self, ids, joiner: str = " ") -> str:
        """Token strings of `ids` joined by `joiner` (specials included: strip them first if unwanted)."""
        self.check_text_safe(joiner)
        try:
            return joiner.join(map(self.id_to_token.__getitem__, ids))
        except KeyError:
            pass  # retry with int(): tensor elements hash by identity; a truly unknown id raises below
        try:
            return joiner.join([self.id_to_token[int(i)] for i in ids])
        except KeyError as e:
            raise UserError(f"id {e.args[0]} is not in the hand vocabulary {self.path}") from None

    def text_to_ids(self, text: str, joiner: str = " ") -> tuple[list[int], list[str]]:
        """Inverse of ids_to_text: (ids, unknown_pieces).

        A piece that is not a vocabulary token is listed in unknown_pieces (in order, duplicates kept); in `ids`
        it becomes the unk id when the vocabulary has one, otherwise it is left out. With a whitespace joiner the
        text is split on any run of whitespace, so leading/trailing/doubled spaces are tolerated.
        """
        self.check_text_safe(joiner)
        pieces = text.split() if joiner.isspace() else (text.split(joiner) if text else [])
        ids: list[int] = []
        unknown: list[str] = []
        unk = self.specials.unk
        for piece in pieces:
            i = self.token_to_id.get(piece)
            if i is None:
                unknown.append(piece)
                if unk is not None:
                    ids.append(unk)
            else:
                ids.append(i)
        return ids, unknown


    def first_unknown(self, ids) -> int | None:
        """Position of the first id that is not in the vocabulary, or None."""
        id_to_token = self.id_to_token
        if id_to_token.keys() >= set(ids):  # the common case, checked at C speed
            return None
        for pos, i in enumerate(ids):
            if i not in id_to_token:
                return pos
        return None

    def split_sequence(self, ids, keep_sep: bool = False) -> tuple[list[int], list[int] | None]:
        """(prompt, response) of a hand-vocab id sequence with pad/bos/eos removed wherever they stand.

        response is None when the sequence has no separator (or keep_sep: the separator stays a text token).
        A separator that ends a sequence which already has one (BERT's `[CLS] a [SEP] b [SEP]`) is an end
        marker and dropped. Raises SequenceError(position) for any further separator, and for a token after
        the end-of-sequence token other than pad or eos: padding whose token is not known as pad (or two
        sequences in one row), which would otherwise end up in the text.
        """
        s = self.specials
        drop = {i for i in (s.pad, s.bos, s.eos) if i is not None}
        if s.eos is not None and s.eos in ids:
            end = ids.index(s.eos)
            after = [pos for pos, i in enumerate(ids[end + 1:], end + 1) if i != s.eos and i != s.pad]
            if after:
                tok, eos = self.id_to_token[ids[after[0]]], self.id_to_token[s.eos]
                raise SequenceError(after[0], f"{tok!r} after the end-of-sequence token {eos!r} (at position {end}); "
                                              f"if it pads the row, name it with --pad-token {tok}")
        if s.sep is None or keep_sep:
            return [i for i in ids if i not in drop], None
        kept = [i for i in ids if i not in drop] if drop.intersection(ids) else list(ids)
        n_sep = kept.count(s.sep)
        if n_sep >= 2 and kept[-1] == s.sep:
            kept.pop()
            n_sep -= 1
        if n_sep > 1:
            second = [pos for pos, i in enumerate(ids) if i == s.sep][1]
            raise SequenceError(second, f"a second separator {self.id_to_token[s.sep]!r} "
                                        f"(only one prompt/response split per sequence)")
        if not n_sep:
            return kept, None
        k = kept.index(s.sep)
        return kept[:k], kept[k + 1:]


class SequenceError(ValueError):
    """A problem at one position of one sequence; the caller adds file and row."""

    def __init__(self, position: int, message: str):
        super().__init__(message)
        self.position = position

# ---------------------------------------------------------------------------------------------------------------
# Loading


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _walk_flat_json(path: str, text: str):
    """Yield (line, key_or_index, value) for the entries of a top-level JSON object or list, in file order."""
    dec = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end()
    if pos >= len(text):
        raise UserError(f"{path}: empty vocabulary file")
    opener = text[pos]
    if opener not in "{[":
        raise UserError(f"{path}:{_line(text, pos)}: expected a JSON object or list of tokens")
    closer = "}" if opener == "{" else "]"
    pos = ws.match(text, pos + 1).end()
    index = 0
    if text.startswith(closer, pos):
        return
    while True:
        line = _line(text, pos)
        if opener == "{":
            key, pos = dec.raw_decode(text, pos)
            pos = ws.match(text, pos).end()
            pos = ws.match(text, pos + 1).end()  # the ':' (json.loads already validated the syntax)
        else:
            key = index
        value, pos = dec.raw_decode(text, pos)
        yield line, key, value
        index += 1
        pos = ws.match(text, pos).end()
        if text[pos] == closer:
            return
        pos = ws.match(text, pos + 1).end()


def _as_id(path: str, line: int, value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"{path}:{line}: {what} {value!r} is not an integer id")
    if isinstance(value, str):
        if not re.fullmatch(r"\s*[0-9]+\s*", value):  # ASCII digits: int() would also take '١٢' and '1_0'
            raise UserError(f"{path}:{line}: {what} {value!r} is not an integer id")
        value = int(value)
    if value < 0:
        raise UserError(f"{path}:{line}: {what} {value} is negative; ids must be >= 0")
    if value > MAX_ID:
        raise UserError(f"{path}:{line}: {what} {value} is too large; ids must be < 2**63")
    return value


def _entries_from_json(path: str, text: str) -> list[tuple[int, str, int]]:
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    entries = []
    kind = None  # "token->id" | "id->token" | "list", fixed by the first entry
    for line, key, value in _walk_flat_json(path, text):
        if isinstance(key, int):
            kind = "list"
            if not isinstance(value, str):
                raise UserError(f"{path}:{line}: list element {value!r} is not a token string")
            entries.append((line, value, key))
            continue
        if kind is None:
            kind = "id->token" if isinstance(value, str) else "token->id"
        if kind == "token->id":
            if isinstance(value, str):
                raise UserError(f"{path}:{line}: id {value!r} of token {key!r} is not an integer id "
                                f"(the file maps tokens to ids, judged by its first entry)")
            entries.append((line, key, _as_id(path, line, value, f"id of token {key!r}:")))
        else:
            if not isinstance(value, str):
                raise UserError(f"{path}:{line}: value {value!r} for key {key!r} is not a token string "
                                f"(the file maps ids to tokens, judged by its first entry)")
            entries.append((line, value, _as_id(path, line, key, "key")))
    return entries


def _entries_from_text(path: str, text: str) -> list[tuple[int, str, int]]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if not lines:
        raise UserError(f"{path}: empty vocabulary file")
    entries = []
    if "\t" in lines[0]:
        for n, ln in enumerate(lines, 1):
            if "\t" not in ln:
                raise UserError(f"{path}:{n}: expected 'token<TAB>id' (the first line has a TAB)")
            tok, _, id_str = ln.rpartition("\t")
            entries.append((n, tok, _as_id(path, n, id_str.strip(), f"id of token {tok!r}:")))
    else:
        for n, ln in enumerate(lines, 1):
            entries.append((n, ln, n - 1))
    return entries


def _resolve_specials(path: str, token_to_id: dict[str, int], overrides: dict[str, str | None]) -> Specials:
    ids = {}
    for role in ROLES:
        flag = overrides.get(role)
        if flag is not None:
            if flag == "":
                ids[role] = None  # explicitly disabled
            elif flag in token_to_id:
                ids[role] = token_to_id[flag]
            else:
                raise UserError(f"--{role}-token {flag!r}: not a token of the vocabulary {path}")
            continue
        found = [n for n in DEFAULT_SPECIAL_NAMES[role] if n in token_to_id]
        if len(found) > 1:
            raise UserError(f"{path}: several {role} tokens ({', '.join(found)}); choose one with --{role}-token")
        ids[role] = token_to_id[found[0]] if found else None
    taken: dict[int, str] = {}
    for role, i in ids.items():
        if i is not None:
            if i in taken:
                raise UserError(f"{path}: token {i} is both the {taken[i]} and the {role} token; "
                                f"fix it with --{role}-token")
            taken[i] = role
    return Specials(**ids)


def load_hand_vocab(path: str | os.PathLike, specials: dict[str, str | None] | None = None,
                    choose_specials: bool = True) -> HandVocab:
    """Load a vocabulary file in any supported format.

    `specials` overrides detection per role ("pad", "bos", "eos", "sep", "unk"): a token string of the vocabulary,
    "" to declare that the role has no token, or None/absent for detection by the common names.
    choose_specials=False leaves every role None until `with_specials`: for callers that must compare the
    vocabulary's sha256 with a recorded one before its specials can be chosen (or fail to be).
    """
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise UserError(f"--vocab {name}: no such file")
    if p.is_dir():
        raise UserError(f"--vocab {name}: is a directory, expected a vocabulary file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(f"--vocab {name}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{name}:{line}: not UTF-8 text") from None
    if not text.strip():
        raise UserError(f"{name}: empty vocabulary file")
    looks_json = p.suffix.lower() == ".json"
    if not looks_json and text.lstrip()[:1] in ("{", "["):
        try:  # a text vocabulary may start with "[PAD]": JSON only if the whole text parses as such
            looks_json = isinstance(json.loads(text), (dict, list))
        except ValueError:
            looks_json = False
    entries = _entries_from_json(name, text) if looks_json else _entries_from_text(name, text)
    if not entries:
        raise UserError(f"{name}: the vocabulary has no tokens")

    token_to_id: dict[str, int] = {}
    id_to_token: dict[int, str] = {}
    line_of: dict[int, int] = {}
    for line, tok, i in entries:
        if tok == "" or tok.isspace():
            raise UserError(f"{name}:{line}: empty token (id {i})")
        bad = LONE_SURROGATE_RE.search(tok)
        if bad:  # only a JSON escape such as "\ud800" makes one; no UTF-8 output could hold it
            raise UserError(f"{name}:{line}: token {tok!r} (id {i}) is not valid Unicode (a lone surrogate at "
                            f"character {bad.start()})")
        if tok in token_to_id:
            raise UserError(f"{name}:{line}: duplicate token {tok!r} (first at line {line_of[token_to_id[tok]]})")
        if i in id_to_token:
            raise UserError(f"{name}:{line}: duplicate id {i} (token {tok!r}; line {line_of[i]} has "
                            f"{id_to_token[i]!r})")
        token_to_id[tok] = i
        id_to_token[i] = tok
        line_of[i] = line

    canonical = json.dumps(sorted(id_to_token.items()), ensure_ascii=False).encode()
    return HandVocab(
        path=name,
        token_to_id=token_to_id,
        id_to_token=id_to_token,
        specials=_resolve_specials(name, token_to_id, specials or {}) if choose_specials else Specials(),
        sha256=hashlib.sha256(canonical).hexdigest(),
        file_sha256=hashlib.sha256(raw).hexdigest(),
        line_of=line_of,
    )
