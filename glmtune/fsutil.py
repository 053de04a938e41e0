"""Atomic folder output: build a folder beside its destination, then put it in place with one rename.

Shared by every command that writes a model folder (save/merge, quantize, init-model), so a failure or
a kill never leaves a half-written folder where a complete one is expected, and an existing folder is
only replaced once the new one is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
