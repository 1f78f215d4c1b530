"""Files written under a temporary name and renamed into place get the mode a plain ``open()`` would give."""

from __future__ import annotations

import os
import tempfile


def temporary_file(directory, prefix: str, suffix: str = "") -> str:
    """Create an empty file in ``directory`` for writing, closed, with :func:`set_plain_mode`; return its path."""
    handle, path = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)
    os.close(handle)
    set_plain_mode(path)
    return path


def set_plain_mode(path) -> None:
    """Give ``path`` mode 0666 & ~umask, as ``open()`` would.

    ``tempfile.mkstemp`` creates files with mode 0600 (and writers that replace the file, like safetensors'
    ``save_file``, may too), so a report renamed from one would be unreadable by the group and others even
    under the usual umask 022.
    """
    mask = os.umask(0o077)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
