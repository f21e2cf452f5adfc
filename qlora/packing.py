"""JSONL documents -> Llama-3 token ids -> rows of exactly max_len tokens (used by pretokenize.py).

Three steps, each a plain function so tests can drive them directly:
  * parse_jsonl_lines: raw JSONL lines -> texts + formats, one-line errors naming file:line.
  * tokenize_documents: texts -> one flat int32 array of ids with per-document lengths and label-mask lengths.
    Encoded with add_special_tokens=False and BOS placed here, so a tokenizer that adds BOS itself (Meta's
    files) and one that does not (bare tokenizer.json) give the same ids; special-token strings in the text
    become their single ids (the tokenizer matches added tokens before BPE).
  * pack_documents / Packer: best-fit-decreasing over a bounded window into rows of exactly max_len, never
    splitting a document (except --long split, see below); padding only at a row's tail.

Labels are not stored per document; a document carries `mask_len`, the number of leading tokens whose label is
-100: 1 (its BOS: no loss crosses a document boundary) or, for chat without --train-on-prompt, everything up to
and including the last assistant header.

--long split: a document longer than max_len is cut into pieces of max_len tokens; every piece after the first
gets its own <|begin_of_text|> (so every segment in doc_lens starts with BOS and the trainer's per-document
attention sees well-formed segments) and that BOS has label -100. Only the last piece ends with the end token.
The full pieces are emitted as rows of their own, the last one is packed like any other document.
"""
from __future__ import annotations

import bisect
import itertools
import json
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from .errors import UserError
from .llama3 import (ASSISTANT_HEADER, BOS_ID, END_OF_TEXT_ID, EOT_ID, FORMATS, IGNORE_INDEX, LONE_SURROGATE_RE,
                     PAD_ID)

END_ID = {"plain": END_OF_TEXT_ID, "chat": EOT_ID}
DEFAULT_LONG_POLICY = {"plain": "split", "chat": "drop"}
LONG_POLICIES = ("split", "drop", "error")


@dataclass
class TokenizedChunk:
    """Documents of one chunk of a JSONL file, ids concatenated (a flat array pickles cheaply between processes)."""
    path: str
    ids: np.ndarray          # int32, all documents back to back
    lens: np.ndarray         # int64, tokens per document
    mask_lens: np.ndarray    # int64, leading tokens of each document with label -100 (>= 1)
    lines: np.ndarray        # int64, 1-based JSONL line of each document (for error messages)
    formats: np.ndarray      # int8, index into FORMATS
    n_bytes: int = 0         # raw JSONL bytes this chunk came from (progress bar)

    def __len__(self) -> int:
        return len(self.lens)


def parse_jsonl_lines(lines: Sequence[bytes | str], path: str, first_line: int) -> tuple[list[str], list[str], list[int]]:
    """Contract-1 records -> (texts, formats, line numbers). Blank lines are skipped; everything else is validated."""
    texts, formats, line_nos = [], [], []
    for i, raw in enumerate(lines):
        line_no = first_line + i
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise UserError(f"{path}:{line_no}: malformed JSON line ({e})") from None
        if not isinstance(rec, dict):
            raise UserError(f"{path}:{line_no}: expected a JSON object with a \"text\" field, got {type(rec).__name__}")
        text = rec.get("text")
        if text is None:
            raise UserError(f"{path}:{line_no}: record has no \"text\" field (keys: {', '.join(sorted(rec)) or 'none'})")
        if not isinstance(text, str):
            raise UserError(f"{path}:{line_no}: \"text\" is a {type(text).__name__}, expected a string")
        bad = None if text.isascii() else LONE_SURROGATE_RE.search(text)
        if bad:  # a JSON escape such as "\ud800" alone: the tokenizer takes only valid Unicode
            raise UserError(f"{path}:{line_no}: \"text\" is not valid Unicode (a lone surrogate at character "
                            f"{bad.start()})")
        fmt = rec.get("format")
        if fmt is None:
            fmt = "chat" if ASSISTANT_HEADER in text else "plain"
        elif fmt not in FORMATS:
            raise UserError(f"{path}:{line_no}: \"format\" is {fmt!r}, expected one of {', '.join(FORMATS)}")
        texts.append(text)
        formats.append(fmt)
        line_nos.append(line_no)
    return texts, formats, line_nos


def tokenize_documents(tokenizer, texts: Sequence[str], formats: Sequence[str], *, train_on_prompt: bool = False,
                       path: str = "<memory>", line_nos: Sequence[int] | None = None, fast: bool = False) -> TokenizedChunk:
    """Encode documents: exactly one BOS first, the format's end token last, and the label-mask length of each.

    `tokenizer` is a `tokenizers.Tokenizer` (a transformers fast tokenizer's `.backend_tokenizer`).
    Chat masks come from character offsets: every token that starts before the end of the last assistant header
    is masked (a token straddling that boundary, e.g. "\\n\\n\\n" when the response starts with a newline, is
    masked too: it is still part of the prompt).
    """
    if line_nos is None:
        line_nos = list(range(1, len(texts) + 1))
    has_chat = "chat" in formats and not train_on_prompt
    # encode_batch_fast skips offsets, which only chat masking needs.
    encode = tokenizer.encode_batch if (has_chat or not fast) else tokenizer.encode_batch_fast
    encodings = encode(list(texts), add_special_tokens=False)
    all_ids: list[list[int]] = []
    mask_lens = np.ones(len(texts), dtype=np.int64)
    for i, (text, fmt, enc) in enumerate(zip(texts, formats, encodings)):
        ids = enc.ids
        added_bos = not ids or ids[0] != BOS_ID
        if added_bos:
            ids.insert(0, BOS_ID)
        end = END_ID[fmt]
        if ids[-1] != end or len(ids) == 1:
            ids.append(end)
        if fmt == "chat":
            cut = text.rfind(ASSISTANT_HEADER)
            if cut < 0:
                raise UserError(f"{path}:{line_nos[i]}: chat record without {ASSISTANT_HEADER!r}")
            if not train_on_prompt:
                cut += len(ASSISTANT_HEADER)
                tok = enc.char_to_token(cut) if cut < len(text) else None
                if tok is None:  # nothing after the header: the whole text is prompt
                    n = len(enc)
                else:
                    n = tok + (1 if enc.token_to_chars(tok)[0] < cut else 0)
                mask_lens[i] = n + added_bos
        all_ids.append(ids)
    lens = np.fromiter(map(len, all_ids), dtype=np.int64, count=len(all_ids))
    flat = np.fromiter(itertools.chain.from_iterable(all_ids), dtype=np.int32, count=int(lens.sum()))
    n_bos = int(np.count_nonzero(flat == BOS_ID))
    if n_bos != len(all_ids):  # a BOS inside a document (rare): find which one, for the message
        for i, ids in enumerate(all_ids):
            if ids.count(BOS_ID) > 1:
                raise UserError(f"{path}:{line_nos[i]}: <|begin_of_text|> inside the document "
                                "(each document must hold exactly one, at its start)")
    fmt_idx = np.fromiter((FORMATS.index(f) for f in formats), dtype=np.int8, count=len(formats))
    return TokenizedChunk(path, flat, lens, mask_lens, np.asarray(line_nos, dtype=np.int64), fmt_idx)


@dataclass
class PackStats:
    documents: int = 0       # input documents kept (a split document counts once)
    segments: int = 0        # entries in doc_lens (split pieces count separately)
    tokens: int = 0          # non-pad tokens written
    rows: int = 0
    long_split: int = 0
    long_dropped: int = 0
    dropped_tokens: int = 0
    formats: dict = field(default_factory=lambda: {f: 0 for f in FORMATS})

    def as_dict(self, max_len: int) -> dict:
        return {"rows": self.rows, "documents": self.documents, "segments": self.segments, "tokens": self.tokens,
                "fill_rate": round(self.tokens / (self.rows * max_len), 6) if self.rows else 0.0,
                "long_split": self.long_split, "long_dropped": self.long_dropped,
                "dropped_tokens": self.dropped_tokens, "formats": dict(self.formats)}


@dataclass
class PackedRow:
    input_ids: np.ndarray    # int32 [max_len]
    labels: np.ndarray       # int32 [max_len]
    doc_lens: list[int]


class _Bin:
    __slots__ = ("ids", "used", "doc_lens", "mask_lens")

    def __init__(self, max_len: int):
        self.ids = np.full(max_len, PAD_ID, dtype=np.int32)
        self.used = 0
        self.doc_lens: list[int] = []
        self.mask_lens: list[int] = []

    def add(self, ids: np.ndarray, mask_len: int) -> None:
        n = len(ids)
        self.ids[self.used:self.used + n] = ids
        self.used += n
        self.doc_lens.append(n)
        self.mask_lens.append(mask_len)

    def to_row(self) -> PackedRow:
        labels = self.ids.copy()
        start = 0
        for n, m in zip(self.doc_lens, self.mask_lens):
            labels[start:start + m] = IGNORE_INDEX
            start += n
        labels[self.used:] = IGNORE_INDEX
        return PackedRow(self.ids, labels, self.doc_lens)


class Packer:
    """Best-fit-decreasing into rows of exactly max_len, with bounded memory.

    Documents are buffered until `window_tokens` tokens, sorted longest first and each placed into the open row
    with the least room that still fits it (best fit); a row that is full is emitted at once, and when more than
    `max_open` rows are open the fullest is emitted. Memory: max_open + window_tokens/max_len rows of int32.
    Hand-written because no maintained library does streaming bin packing of token arrays; the whole algorithm is
    two sorted lists and bisect.
    """

    def __init__(self, max_len: int, *, long_policy: dict[str, str] | None = None, stats: PackStats | None = None,
                 max_open: int = 256, window_tokens: int | None = None):
        if max_len < 8:
            raise UserError(f"--max-len {max_len}: must be at least 8")
        self.max_len = max_len
        self.long_policy = dict(DEFAULT_LONG_POLICY, **(long_policy or {}))
        self.stats = stats or PackStats()
        self.max_open = max_open
        self.window_tokens = window_tokens or 64 * max_len
        self._window: list[tuple[np.ndarray, int]] = []
        self._window_tokens = 0
        self._free: list[tuple[int, int]] = []   # (room left, bin id), sorted
        self._bins: dict[int, _Bin] = {}
        self._next_id = 0

    # -- input -----------------------------------------------------------------------------------------------
    def add_chunk(self, chunk: TokenizedChunk) -> Iterator[PackedRow]:
        offsets = np.concatenate(([0], np.cumsum(chunk.lens)))
        L = self.max_len
        for i in range(len(chunk)):
            n = int(chunk.lens[i])
            ids = chunk.ids[offsets[i]:offsets[i] + n]
            mask = int(chunk.mask_lens[i])
            fmt = FORMATS[chunk.formats[i]]
            self.stats.formats[fmt] += 1
            if n > L:
                policy = self.long_policy[fmt]
                if policy == "error":
                    raise UserError(f"{chunk.path}:{int(chunk.lines[i])}: document has {n} tokens, more than "
                                    f"--max-len {L} (--long error; use --long split or drop)")
                if policy == "drop":
                    self.stats.long_dropped += 1
                    self.stats.dropped_tokens += n
                    continue
                self.stats.long_split += 1
                self.stats.documents += 1
                # first piece: the document's own BOS; later pieces: a fresh BOS + the next L-1 tokens
                pieces = [(ids[:L], min(mask, L))]
                pos = L
                while pos < n:
                    part = ids[pos:pos + L - 1]
                    pieces.append((np.concatenate(([BOS_ID], part)).astype(np.int32),
                                   1 + int(np.clip(mask - pos, 0, len(part)))))
                    pos += L - 1
                for piece, m in pieces:
                    if len(piece) == L:
                        b = _Bin(L)
                        b.add(piece, m)
                        yield self._emit(b)
                    else:
                        yield from self._add(piece.copy(), m)
                continue
            self.stats.documents += 1
            yield from self._add(ids.copy(), mask)

    def _add(self, ids: np.ndarray, mask: int) -> Iterator[PackedRow]:
        self._window.append((ids, mask))
        self._window_tokens += len(ids)
        if self._window_tokens >= self.window_tokens:
            yield from self._flush_window()

    def _flush_window(self) -> Iterator[PackedRow]:
        window = sorted(self._window, key=lambda d: -len(d[0]))  # stable: equal lengths keep input order
        self._window, self._window_tokens = [], 0
        for ids, mask in window:
            n = len(ids)
            j = bisect.bisect_left(self._free, (n, -1))
            if j < len(self._free):
                room, bid = self._free.pop(j)
                b = self._bins[bid]
            else:
                bid, b = self._next_id, _Bin(self.max_len)
                self._next_id += 1
                self._bins[bid] = b
            b.add(ids, mask)
            room = self.max_len - b.used
            if room == 0:
                yield self._emit(self._bins.pop(bid))
                continue
            bisect.insort(self._free, (room, bid))
            if len(self._free) > self.max_open:
                _, fullest = self._free.pop(0)
                yield self._emit(self._bins.pop(fullest))

    def _emit(self, b: _Bin) -> PackedRow:
        self.stats.rows += 1
        self.stats.segments += len(b.doc_lens)
        self.stats.tokens += b.used
        return b.to_row()

    def finish(self) -> Iterator[PackedRow]:
        yield from self._flush_window()
        for _, bid in sorted(self._free):
            yield self._emit(self._bins.pop(bid))
        self._free = []


def pack_documents(chunks: Iterable[TokenizedChunk], max_len: int, *, long_policy: dict[str, str] | None = None,
                   stats: PackStats | None = None, **packer_kw) -> Iterator[PackedRow]:
    """Rows of exactly max_len tokens from a stream of tokenized chunks (see Packer)."""
    packer = Packer(max_len, long_policy=long_policy, stats=stats, **packer_kw)
    for chunk in chunks:
        yield from packer.add_chunk(chunk)
    yield from packer.finish()
