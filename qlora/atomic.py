"""Outputs written whole or not at all, and never at the cost of the user's files.

  * check_output_dir: whether a stage may replace (or own) an output directory: not one that holds or lies inside
    an input, not one some other program wrote, not one that cannot be created. Every stage calls it first;
    check_output_file is the same for an output file.
  * atomic_dir / atomic_file / write_json_atomic: write into a hidden temporary sibling and rename it into place
    on success; on an error or an interruption the temporary is removed.
  * output_errors: a full disk or a read-only file system while writing becomes one line naming the output.

Temporaries are named `.NAME.tmp-HOST-PID` (and `.NAME.old-HOST-PID` for the moment a replaced directory is
moved aside). A process killed outright (SIGKILL, power loss) cannot remove its own, so every atomic write first
removes those of NAME left by processes of this host that no longer run; the host is in the name because on a
cluster's shared file system another node's process with the same pid may still be writing.
Files get the permissions a plain open() would give them (0666 less the umask), directories 0777 less the umask.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from .errors import UserError

HOST = socket.gethostname()
# `.NAME.` is matched separately; then the kind and the writer: HOST-PID, or a bare PID (names before the host)
_TEMPORARY_RE = re.compile(r"(?P<kind>tmp|old)-(?:(?P<host>.+)-)?(?P<pid>\d+)")
# errors that only writing raises, whatever file they name
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _temporary(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{HOST}-{os.getpid()}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Remove the temporaries of `path` that processes of this host left when they were killed.

    A process killed between the two renames of atomic_dir's swap had moved the old output aside and not yet put
    the new one in place: when `path` is missing, that old output is renamed back.
    """
    path = Path(path)
    prefix = f".{path.name}."
    try:
        siblings = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:  # the parent does not exist (yet) or cannot be listed: nothing of ours is there
        return
    stale = []
    for p in siblings:
        m = _TEMPORARY_RE.fullmatch(p.name[len(prefix):])
        if m and (m["host"] or HOST) == HOST and not _running(int(m["pid"])):
            stale.append((m["kind"] != "old", p))  # moved-aside outputs first, so one can be restored
    for _, p in sorted(stale):
        if p.name.startswith(f"{prefix}old-") and not os.path.lexists(path):
            os.replace(p, path)
        else:
            _remove(p)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (a rename pair is never cut in half); then they act."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` as a whole, on error it is removed.

    The swap is two renames (old -> aside, tmp -> path), so readers see either the old or the new tree, never a
    mix of both. Call check_output_dir first: everything in an existing `path` is lost.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temporary(path)
    _remove(tmp)  # a leftover of an earlier process that had this pid
    tmp.mkdir()
    aside = None
    try:
        yield tmp
        with _signals_held():
            if os.path.lexists(path):
                aside = _temporary(path, "old")
                os.replace(path, aside)
            try:
                os.replace(tmp, path)
            except BaseException:
                if aside is not None:
                    os.replace(aside, path)
                    aside = None
                raise
    except BaseException:
        _remove(tmp)
        raise
    finally:
        if aside is not None:
            _remove(aside)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary sibling for writing; rename it onto `path` only when the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temporary(path)
    _remove(tmp)
    # created like open() creates a file: 0666 less the umask (mkstemp's 0600 would hide outputs from the group)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj, *, allow_nan: bool = True) -> None:
    """allow_nan=False: a NaN or infinity raises ValueError instead of writing JSON that strict readers refuse."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False, allow_nan=allow_nan)
        f.write("\n")


# ---------------------------------------------------------------------------------------------------------------
# Is it safe to write there?


def _paths(value) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value]


def _spellings(path: Path) -> set[Path]:
    """The path as written (made absolute) and with symlinks resolved: a link into the output, or an output that
    is a link, must be caught whichever way the user named it."""
    return {Path(os.path.abspath(path)), path.resolve()}


def check_output_dir(path: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | Iterable | None], *,
                     stage: str, marker: Mapping[str, object] | None = None, marker_file: str = "metadata.json",
                     flag: str = "--output-dir", ignore: Iterable[str] = ()) -> None:
    """Raise a one-line UserError unless a command may replace the directory `path` whole (or own it).

    inputs: every path the command reads, by the flag that named it, e.g. {"--vocab": "v.json", "--input": files};
        None values are skipped. The output must not be an input, hold one anywhere beneath it (replacing it
        would delete the input) or lie inside an input directory (rerunning the stage that wrote that directory
        would delete the output).
    stage: the command's name, for the message ("data_processing").
    marker: what marks an earlier output of this command: {key: value} pairs of which at least one must be in
        the JSON object of path/marker_file (a tuple value: any of its values). Default {"stage": stage}. A
        directory that is not empty and not marked is refused: it holds something else of the user's.
    flag: the option that named `path`, for the message.
    ignore: names of entries that do not make the directory "not empty" (a stop file a job script may create
        before the stage has started).

    Also refused: a path that is a file, lies under a file, cannot be created (no write permission, read-only
    file system), or holds the working directory.
    """
    out = Path(path)
    marker = dict(marker) if marker is not None else {"stage": stage}
    outs = _spellings(out)
    for in_flag, values in inputs.items():
        for p in _paths(values):
            for o in outs:
                for i in _spellings(p):
                    if o == i or o in i.parents:
                        what = "is" if o == i else "holds"
                        raise UserError(f"{flag} {path}: {what} the input {in_flag} {p}, which replacing the output "
                                        f"would delete; choose another output directory")
                    if i in o.parents and i.is_dir():
                        raise UserError(f"{flag} {path}: lies inside the input {in_flag} {p}; choose an output "
                                        f"directory outside every input")
    cwd = Path.cwd()
    if any(o == cwd or o in cwd.parents for o in outs):
        raise UserError(f"{flag} {path}: holds the working directory, which replacing the output would delete; "
                        f"choose another output directory")
    if not os.path.lexists(out):
        _check_creatable(out, flag)
        return
    if not out.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a directory")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot be replaced, its parent directory is not writable")
    try:
        empty = all(p.name in ignore for p in out.iterdir())
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot be read ({e.strerror})") from None
    if empty:
        return
    try:
        recorded = json.loads((out / marker_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict) or not any(recorded.get(k) in (v if isinstance(v, tuple) else (v,))
                                                 for k, v in marker.items()):
        mark = json.dumps(dict([next(iter(marker.items()))]), ensure_ascii=False)[1:-1]
        raise UserError(f"{flag} {path}: exists and is not a {stage} output (its {marker_file} does not say {mark}); "
                        f"refusing to replace it, choose a new or empty directory")


def _check_creatable(path: Path, flag: str) -> None:
    parent = Path(os.path.abspath(path)).parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot be created, {parent} is not writable")


def check_output_file(path: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | Iterable | None], *,
                      flag: str) -> None:
    """Raise a one-line UserError unless a command may write the file `path` (atomic_file replaces it whole).

    inputs: as check_output_dir's. Refused: an input itself, a file inside an input directory (a model's
    config.json is one `--output` away from being replaced), a directory, and a path that cannot be created.
    """
    out = Path(path)
    for in_flag, values in inputs.items():
        for p in _paths(values):
            for o in _spellings(out):
                for i in _spellings(p):
                    if o == i:
                        raise UserError(f"{flag} {path}: is the input {in_flag} {p}, which writing the output would "
                                        f"replace; choose another file")
                    if i in o.parents and i.is_dir():
                        raise UserError(f"{flag} {path}: lies inside the input {in_flag} {p}; write outputs outside "
                                        f"every input directory")
    if out.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file name")
    _check_creatable(out, flag)  # atomic_file writes a temporary next to it: its directory must be writable


@contextlib.contextmanager
def output_errors(flag: str, path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError met while writing the output at `path` into a one-line UserError naming `flag` and `path`:
    a full disk or quota, a file too large, a read-only file system, or any error on the output's own files (its
    temporaries included)."""
    ours = Path(os.path.abspath(path))
    try:
        yield
    except OSError as e:
        named = Path(os.path.abspath(e.filename)) if isinstance(e.filename, (str, os.PathLike)) else None
        on_output = named is not None and (named in ours.parents or any(
            p == ours or p.parent == ours.parent and p.name.startswith(f".{ours.name}.")
            for p in (named, *named.parents)))
        if e.errno not in _WRITE_ERRNOS and not on_output:
            raise
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise UserError(f"{flag} {path}: cannot write{f' {named}' if on_output and named != ours else ''} "
                        f"({reason})") from None
