"""File helpers shared by every command: atomic output, and reading user text files with clear errors.

Atomic folder output builds a folder beside its destination, then puts it in place with one rename
(save/merge, quantize, init-model), so a failure or a kill never leaves a half-written folder where a
complete one is expected, and an existing folder is only replaced once the new one is complete;
`atomic_file` / `atomic_write_text` do the same for single files. `text_lines` reads a user's text file
line by line and reports a non-UTF-8 byte with its line instead of a bare UnicodeDecodeError;
`json_line` parses one JSON Lines record and names the right column on error; `iter_records` reads a
data file (JSON Lines, a JSON array or CSV) as (file:line, record) pairs for both model families' data
readers (`glmtune.data.preprocess`, `glmtune.families.chatglm3.data`), which therefore need not import each other.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from glmtune.errors import GlmtuneError


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to `out`; on success it becomes `out`, on error it is removed.

    An existing `out` is moved aside first and deleted after the rename, so at every moment either the
    old or the new folder is complete. Files get the modes the user's umask allows (mkdtemp and
    mkstemp create owner-only ones).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        _umask_modes(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "previous")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask_modes(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    folder.chmod(0o777 & ~umask)


def check_output_dir(output_dir: str | Path, force: bool, *sources: str | Path | None) -> Path:
    """Refuse a non-empty OUT without `force`, and always refuse an OUT that is, or holds, an input.

    `save_model` replaces OUT wholesale, so with --force an OUT equal to (or above) the base model or
    checkpoint folder would delete the inputs.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise GlmtuneError(f"--output-dir {out}: exists and is not a folder")
    resolved = out.resolve()
    for source in sources:
        if source is None:
            continue
        src = Path(source).resolve()
        if resolved == src or resolved in src.parents:
            raise GlmtuneError(f"--output-dir {out}: is or contains the input folder {source}; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise GlmtuneError(f"--output-dir {out}: folder exists and is not empty (pass --force to replace it)")
    return out


@contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open a temporary file beside `path` for writing; on success it replaces `path` in one rename.

    The one helper for single-file outputs (JSON results, reports, metrics rewrites, plots): a crash or
    a kill leaves the old file or the new one, never half of one. `mode` is "w" (text) or "wb".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    tmp = Path(name)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp makes 0600; give the file the modes its neighbours get
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as handle:
        handle.write(text)
    return Path(path)


def read_json_file(path: str | Path, what: str):
    """The parsed content of a small JSON file (a history, a tools list), or one clear error naming it."""
    path = Path(path)
    if not path.is_file():
        raise GlmtuneError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise GlmtuneError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise GlmtuneError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg})") from None


def text_lines(path: str | Path) -> Iterator[str]:
    """The file's lines as text, line endings kept; a UTF-8 BOM is dropped (as `utf-8-sig`).

    Decoding line by line (a UTF-8 character never contains the byte \\n) lets a non-UTF-8 file be reported
    with its line and byte offset instead of a bare UnicodeDecodeError.
    """
    offset = 0
    with Path(path).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise GlmtuneError(
                    f"{path}:{number}: not UTF-8 text (byte {raw[exc.start]:#04x} at byte offset {offset + exc.start}); "
                    "save the file as UTF-8"
                ) from None
            offset += len(raw)


def json_line(where: str, line: str):
    """One JSON Lines record. The line ending is cut first: json counts a truncated line's error after the
    newline ("line 2 column 1"), which would name column 1 instead of the end of the line."""
    try:
        return json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        raise GlmtuneError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def iter_records(path: Path):
    """Yield (where, record) from JSON Lines, a JSON array, or CSV; `where` is 'file:line' (or ':item N')."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl", ".csv"):
        raise GlmtuneError(f"{path}: unsupported file type {suffix!r} (expected .json, .jsonl or .csv)")
    with contextlib.closing(text_lines(path)) as lines:
        if suffix == ".csv":
            yield from _csv_records(path, lines)
            return
        head: list[str] = []  # lines up to the first non-blank one, which tells an array from JSON Lines
        for line in lines:
            head.append(line)
            if line.strip():
                break
        if "".join(head).lstrip().startswith("["):  # one JSON array of objects
            try:
                items = json.loads("".join(head) + "".join(lines))
            except json.JSONDecodeError as exc:
                raise GlmtuneError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            for index, record in enumerate(items):
                yield f"{path}: item {index}", record
            return
        for number, line in enumerate(itertools.chain(head, lines), start=1):
            if not line.strip():
                continue
            yield f"{path}:{number}", json_line(f"{path}:{number}", line)


def _csv_records(path: Path, lines):
    """(where, record) per CSV row. Malformed CSV is an error naming the row's first line: a row with more
    fields than the header (as pandas, which the official `load_dataset("csv")` uses), or a quote never
    closed (which would otherwise swallow the rest of the file into one field). A shorter row keeps None
    for its missing fields, as pandas keeps NaN, and is then dropped as empty."""
    reader = csv.reader(lines, strict=True)
    start = 1
    try:
        header = next(reader, None)
        if header is None:
            return
        start = reader.line_num + 1
        for fields in reader:
            where = f"{path}:{start}"
            if not fields:  # a blank line
                start = reader.line_num + 1
                continue
            if len(fields) > len(header):
                raise GlmtuneError(f"{where}: {len(fields)} fields, but the header has {len(header)} ({header}); "
                                   "quote fields that contain commas")
            yield where, dict(itertools.zip_longest(header, fields))
            start = reader.line_num + 1
    except csv.Error as exc:
        hint = "; a quoted field is never closed" if "end of data" in str(exc) else ""
        raise GlmtuneError(f"{path}:{start}: malformed CSV ({exc}{hint})") from None
