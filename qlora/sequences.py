"""Readers for hand-vocabulary id sequences: one iterator over many files of mixed formats.

`iter_sequences(files, ids_field)` yields Row(file, row, ids, padded) with `row` the 0-based row index in its file
(for .txt/.jsonl the 0-based line index, so blank lines keep the numbering), `ids` a list of ints, and `padded`
True for the rows of a rectangular array (2-D .npy/.npz/.pt, fixed-size parquet lists), which hold padding
unless every sequence has the same length.

  .txt      one sequence a line, whitespace-separated ids in ASCII digits; blank lines: empty   streamed
  .jsonl    one JSON object a line with the ids under `ids_field` (a bare JSON list is accepted)  streamed
  .parquet  a list<int> column named `ids_field`, read in record batches                          streamed
  .npy      2-D int array (padded) or 1-D object array of int arrays; 2-D is memory-mapped
  .npz      like .npy; the array named `ids_field`, or the only array in the archive              loaded whole
  .pt       tensor (2-D or 1-D), list of lists/tensors, or dict holding one under `ids_field`     loaded whole

Every problem is a one-line UserError naming the file and row: missing, unreadable, damaged or empty file,
malformed line, non-integer value, missing field/column. Object arrays in .npy/.npz and .pt files are unpickled
(the user's own data; .pt is read with torch's weights_only loader).
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Iterator, NamedTuple

from .errors import UserError

SUFFIXES = (".npy", ".npz", ".pt", ".txt", ".jsonl", ".parquet")
LINE_FORMATS = (".txt", ".jsonl")


class Row(NamedTuple):
    file: str
    row: int
    ids: list
    padded: bool = False


def where(file: str, row: int) -> str:
    """Human location of a row: 'f.jsonl line 12' for line formats, 'f.npy row 11' otherwise."""
    if Path(file).suffix.lower() in LINE_FORMATS:
        return f"{file} line {row + 1}"
    return f"{file} row {row}"


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files for the --input arguments (globs expanded and sorted), each checked to exist. A file named twice, in
    any spelling (a glob and ./file, a symlink), is read once, where it is first named."""
    files: list[str] = []
    seen: set[tuple[int, int]] = set()
    for pat in patterns:
        if glob.has_magic(pat):
            matches = sorted(m for m in glob.glob(pat, recursive=True) if os.path.isfile(m))
            if not matches:
                raise UserError(f"--input {pat}: no file matches")
        else:
            if not os.path.exists(pat):
                raise UserError(f"--input {pat}: no such file")
            if os.path.isdir(pat):
                raise UserError(f"--input {pat}: is a directory (use a glob such as {pat.rstrip('/')}/*.jsonl)")
            matches = [pat]
        for m in matches:
            if Path(m).suffix.lower() not in SUFFIXES:
                raise UserError(f"--input {m}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
            st = os.stat(m)
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                files.append(m)
    return files


def count_rows(file: str, ids_field: str = "input_ids") -> int | None:
    """Row count when it is cheap to know without reading the data (parquet footer, .npy header), else None."""
    suffix = Path(file).suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(file).metadata.num_rows
        if suffix == ".npy":
            import numpy as np

            arr = np.load(file, mmap_mode="r", allow_pickle=False)
            return 1 if arr.ndim == 1 else int(arr.shape[0])
    except Exception:
        return None  # the reader will report the problem with a proper message
    return None


def _check_ids(file: str, row: int, values) -> list[int]:
    if set(map(type, values)) <= {int}:  # the common case, checked at C speed
        return values if isinstance(values, list) else list(values)
    out = []
    for pos, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                raise UserError(f"{where(file, row)}, position {pos}: {v!r} is not an integer id")
        out.append(v)
    return out


def _read_txt(file: str) -> Iterator[Row]:
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f):
            values = line.split()
            digits = "".join(values)
            # ASCII digits only: int() would also take '١٢' (Arabic-Indic digits) or '1_000'
            if digits.isascii() and digits.isdigit() or not values:
                yield Row(file, n, [int(x) for x in values])
                continue
            pos, x = next((pos, x) for pos, x in enumerate(values) if not (x.isascii() and x.isdigit()))
            raise UserError(f"{where(file, n)}, position {pos}: {x!r} is not an integer id (ids are written in "
                            f"the digits 0-9)")


def _read_jsonl(file: str, ids_field: str) -> Iterator[Row]:
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                yield Row(file, n, [])
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where(file, n)}: malformed JSON ({e.msg} at column {e.colno})") from None
            if isinstance(rec, dict):
                if ids_field not in rec:
                    fields = ", ".join(map(str, rec)) or "none"
                    raise UserError(f"{where(file, n)}: no field {ids_field!r} (fields: {fields}); "
                                    f"choose the field with --ids-field")
                values = rec[ids_field]
            else:
                values = rec
            if not isinstance(values, list):
                raise UserError(f"{where(file, n)}: field {ids_field!r} is {type(values).__name__}, "
                                f"expected a list of integer ids")
            yield Row(file, n, _check_ids(file, n, values))


def _read_parquet(file: str, ids_field: str, batch_rows: int = 256) -> Iterator[Row]:
    """Record batches of `batch_rows` rows; each row is sliced out of the batch's flat value buffer, so memory
    is bounded by one batch (and by one row group in the parquet reader), not by the file."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # pre_buffer (pyarrow's default) keeps the compressed column chunks of row groups already read: the
        # reader's memory then grows with the file (12.5 MB for a 9.7 MB file, measured); without it, one row group.
        pf = pq.ParquetFile(file, pre_buffer=False)
    except Exception as e:
        raise UserError(f"{file}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    names = pf.schema_arrow.names
    if ids_field not in names:
        raise UserError(f"{file}: no column {ids_field!r} (columns: {', '.join(names) or 'none'}); "
                        f"choose it with --ids-field")
    typ = pf.schema_arrow.field(ids_field).type
    is_list = pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)
    if not is_list or not (pa.types.is_integer(typ.value_type) or pa.types.is_floating(typ.value_type)):
        raise UserError(f"{file}: column {ids_field!r} has type {typ}, expected list<int>")
    padded = pa.types.is_fixed_size_list(typ)
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[ids_field]):
        col = batch.column(0)
        if pa.types.is_fixed_size_list(col.type):
            col = col.cast(pa.list_(col.type.value_type))
        if col.null_count:
            first = next(i for i, v in enumerate(col.is_null().to_pylist()) if v)
            raise UserError(f"{where(file, row + first)}: null instead of a list of ids")
        offsets = col.offsets.to_numpy()
        values = col.values
        if values.null_count or pa.types.is_floating(values.type):
            flat = values.to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(np.isnan(flat) | (flat != np.floor(flat))) if flat.dtype.kind == "f" \
                else np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))
            bad = bad[(bad >= offsets[0]) & (bad < offsets[-1])]
            if len(bad):
                r = int(np.searchsorted(offsets, bad[0], side="right")) - 1
                raise UserError(f"{where(file, row + r)}, position {int(bad[0] - offsets[r])}: "
                                f"{values[int(bad[0])].as_py()!r} is not an integer id")
            flat = flat.astype(np.int64)
        else:
            flat = values.to_numpy()
        for i in range(len(col)):
            yield Row(file, row, flat[offsets[i]:offsets[i + 1]].tolist(), padded)
            row += 1


def _rows_of_array(file: str, arr) -> Iterator[Row]:
    import numpy as np

    if arr.dtype == object:
        if arr.ndim != 1:
            raise UserError(f"{file}: object array of shape {arr.shape}, expected 1-D (one id array per row)")
        for n, seq in enumerate(arr):
            yield Row(file, n, _ids_from_any(file, n, seq))
        return
    padded = arr.ndim == 2
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise UserError(f"{file}: array of shape {arr.shape}, expected 2-D (rows x positions) or 1-D")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise UserError(f"{file}: array of dtype {arr.dtype}, expected integer ids")
    integral = np.issubdtype(arr.dtype, np.integer)
    for n in range(arr.shape[0]):
        values = arr[n].tolist()
        yield Row(file, n, values if integral else _check_ids(file, n, values), padded)


def _ids_from_any(file: str, n: int, seq) -> list[int]:
    if hasattr(seq, "tolist"):  # numpy array or torch tensor
        seq = seq.tolist()
    if not isinstance(seq, (list, tuple)):
        raise UserError(f"{where(file, n)}: {type(seq).__name__} instead of a list of ids")
    return _check_ids(file, n, seq)


def _load_npy(file: str):
    import numpy as np

    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except ValueError:
        pass  # an object array (1-D array of id arrays) cannot be memory-mapped and needs unpickling
    except Exception as e:
        raise UserError(f"{file}: not a readable .npy file ({str(e).splitlines()[0]})") from None
    try:
        return np.load(file, allow_pickle=True)
    except Exception as e:
        raise UserError(f"{file}: not a readable .npy file ({str(e).splitlines()[0]})") from None


def _load_npz(file: str, ids_field: str):
    import numpy as np

    try:
        archive = np.load(file, allow_pickle=True)
        keys = list(archive.keys())
    except Exception as e:
        raise UserError(f"{file}: not a readable .npz file ({str(e).splitlines()[0]})") from None
    if ids_field in keys:
        key = ids_field
    elif len(keys) == 1:
        key = keys[0]
    else:
        raise UserError(f"{file}: no array {ids_field!r} (arrays: {', '.join(keys) or 'none'}); "
                        f"choose it with --ids-field")
    try:  # members are read (and their checksums checked) only now
        return archive[key]
    except Exception as e:
        raise UserError(f"{file}: array {key!r} is damaged ({str(e).splitlines()[0]})") from None


def _read_pt(file: str, ids_field: str) -> Iterator[Row]:
    import torch

    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{file}: not a readable .pt file ({str(e).splitlines()[0]})") from None
    if isinstance(obj, dict):
        if ids_field not in obj:
            raise UserError(f"{file}: no key {ids_field!r} (keys: {', '.join(map(str, obj)) or 'none'}); "
                            f"choose it with --ids-field")
        obj = obj[ids_field]
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex() or obj.dtype == torch.bool:
            raise UserError(f"{file}: tensor of dtype {obj.dtype}, expected integer ids")
        padded = obj.dim() == 2
        if obj.dim() == 1:
            obj = obj[None, :]
        if obj.dim() != 2:
            raise UserError(f"{file}: tensor of shape {tuple(obj.shape)}, expected 2-D or 1-D")
        for n in range(obj.shape[0]):
            yield Row(file, n, obj[n].tolist(), padded)
        return
    if not isinstance(obj, (list, tuple)):
        raise UserError(f"{file}: holds a {type(obj).__name__}, expected a tensor or a list of id lists")
    if obj and all(isinstance(v, int) and not isinstance(v, bool) for v in obj):
        obj = [obj]  # a single flat sequence
    for n, seq in enumerate(obj):
        yield Row(file, n, _ids_from_any(file, n, seq))


def iter_file(file: str, ids_field: str = "input_ids") -> Iterator[Row]:
    """Rows of one file; raises UserError for an empty file (no row, or only blank lines)."""
    suffix = Path(file).suffix.lower()
    if not os.path.exists(file):
        raise UserError(f"{file}: no such file")
    if suffix == ".txt":
        rows = _read_txt(file)
    elif suffix == ".jsonl":
        rows = _read_jsonl(file, ids_field)
    elif suffix == ".parquet":
        rows = _read_parquet(file, ids_field)
    elif suffix == ".npy":
        rows = _rows_of_array(file, _load_npy(file))
    elif suffix == ".npz":
        rows = _rows_of_array(file, _load_npz(file, ids_field))
    elif suffix == ".pt":
        rows = _read_pt(file, ids_field)
    else:
        raise UserError(f"{file}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
    nonempty = False
    try:
        for r in rows:
            nonempty = nonempty or bool(r.ids)
            yield r
    except UnicodeDecodeError as e:
        raise UserError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{file}: cannot read ({e.strerror or e})") from None
    if not nonempty:
        raise UserError(f"{file}: empty file (no sequences)")


def iter_sequences(files: list[str], ids_field: str = "input_ids") -> Iterator[Row]:
    for file in files:
        yield from iter_file(file, ids_field)
