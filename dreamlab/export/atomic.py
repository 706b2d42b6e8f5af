"""Atomic file writing: nothing half-written ever lies under a final name.

Every dreamlab writer goes through :func:`atomic_write`: it hands out a temporary path in the
destination's own folder (same filesystem, so the final ``os.replace`` is atomic), and on success
renames it over the final name; if the body raises, the temporary file is removed and the
destination is left exactly as it was (absent, or the previous complete file).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once at import: os.umask is process-wide, not thread-safe


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path to write ``path``'s content to; publishes it only on success.

    The temporary file lives next to ``path``, is hidden (leading dot) and keeps ``path``'s
    suffix, so libraries that pick a format from the file extension (imageio, PIL) work on it.
    The destination folder is created if missing.

    Example::

        with atomic_write("out/model.glb") as tmp:
            tmp.write_bytes(data)
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(
                f"the writer for {final} did not create its temporary file {tmp}"
            )
        # mkstemp makes the file 0600; give the published file the usual umask-based mode.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically and returns the final path."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Writes UTF-8 ``text`` to ``path`` atomically (``\\n`` line endings) and returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))
