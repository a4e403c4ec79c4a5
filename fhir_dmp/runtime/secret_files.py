"""Secret files in the data dir (keys, session secret): written whole, mode 0600, never half-read.

Several worker processes start together and may all find a key file missing: each writes its
candidate to a private temp file (``mkstemp``: mode 0600), fsyncs it, and publishes it with
``os.link`` (create-if-absent, atomic) or ``os.replace`` (replace); a reader never sees a file
that exists but is still empty, and of two racing creators the first wins and the other uses its
file. (A bare ``O_CREAT | O_EXCL`` then write leaves a window where the file exists, empty.)
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_secret(path: Path, body: bytes, *, replace: bool = False) -> bool:
    """Publish ``body`` at ``path`` atomically; False when it exists and ``replace`` is False
    (another process created it first: read theirs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
