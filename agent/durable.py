"""Durable file writes: the one implementation every part of mqtt-fleet uses.

A reader sees the old file or the new one, never a part of either, and once a call returns
the change survives a power cut: the data is fsynced before the rename, the folder after it.
A temporary file gets its mode (and owner) before its first byte, so a secret written this
way is never readable by anyone else, not even for a moment. Temporary files are named
``TEMP_PREFIX...`` so that a folder's owner can drop those a crash left behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Final

TEMP_PREFIX: Final = ".tmp-"


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: Path,
    data: bytes,
    mode: int = 0o600,
    *,
    owner_uid: int | None = None,
    sync_folder: bool = True,
    replace: bool = True,
) -> bool:
    """Put ``data`` at ``path`` with ``mode`` (and ``owner_uid``) from its first byte.

    ``sync_folder=False``: a caller writing many files into one folder fsyncs it once at the
    end. ``replace=False``: never replace a file that exists (or appears meanwhile); returns
    False then, True when ``path`` now holds ``data``."""
    folder = path.parent
    temporary = folder / f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(6)}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; never more than asked
            if owner_uid is not None:
                os.fchown(fd, owner_uid, -1)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)  # atomic, and fails if the name is taken
            except FileExistsError:
                os.unlink(temporary)
                return False
            except OSError:  # a filesystem without hard links: a rename is all there is
                os.replace(temporary, path)
            else:
                os.unlink(temporary)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if sync_folder:
        fsync_folder(folder)
    return True


def remove_durably(path: Path) -> bool:
    """Unlink ``path`` (if present) and fsync its folder. True if something was removed."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_folder(path.parent)
    return True
