"""The ``--out`` folder: checked before any work, written without following links, no stale files left.

Rules (docs/cli.md, "Output folder"):

- ``--out`` is created (when the first file is written) if missing. A path that is a file, or a folder this
  user cannot write, fails at once.
- A folder that already holds something is refused unless ``--overwrite`` is given, so a typo cannot mix a new
  report with old files. With ``--overwrite`` the files the earlier report listed in its ``results.json``
  (``meta.outputs``) are removed first, so nothing of it is left that this run does not rewrite (e.g. its PNGs
  under ``--no-plots``); other files in the folder are left alone.
- Every file is written under a temporary name inside ``--out`` and renamed into place. A rename replaces a
  symbolic link itself, so a link planted in ``--out`` (``srp.csv -> ../victim.csv``) is never written
  through, and a run that stops half way leaves no half-written file under a report name.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from typing import Iterator, List

from .._files import temporary_file
from .errors import UsageError

MANIFEST = "results.json"
# Temporary names start with this; they do not make a folder "not empty" (another rank may be writing).
_OURS = ".lrc-"


def _check_writable(path: pathlib.Path) -> None:
    """``path`` (or, where it does not exist yet, its nearest existing ancestor) is a folder this user can
    write; a run that fails later then leaves no empty ``--out`` behind."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {path}: cannot write there ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path}: cannot write there ({existing} is not writable)")


class OutputDir:
    """The report folder of one run; see the module docstring for the rules."""

    def __init__(self, path: pathlib.Path, *, overwrite: bool = False):
        self.path = pathlib.Path(path)
        self.written: List[pathlib.Path] = []
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path}: exists and is not a directory")
        if self.path.is_dir() and not overwrite and any(not entry.name.startswith(_OURS)
                                                        for entry in self.path.iterdir()):
            raise UsageError(f"--out {self.path}: the folder is not empty; pass --overwrite to replace the report "
                             "in it, or choose a new folder")
        _check_writable(self.path)
        self._stale = self._earlier_report_files() if overwrite else []

    def _earlier_report_files(self) -> List[str]:
        """Names listed by the earlier report's manifest; a manifest that is a link or unreadable lists none."""
        manifest = self.path / MANIFEST
        if manifest.is_symlink() or not manifest.is_file():
            return []
        try:
            names = json.loads(manifest.read_text(encoding="utf-8")).get("meta", {}).get("outputs", [])
        except (OSError, ValueError, AttributeError):
            return []
        # only plain names of this folder: a manifest cannot point elsewhere
        return [name for name in names if isinstance(name, str) and name == pathlib.Path(name).name
                and name not in ("", ".", "..")]

    def remove_stale(self) -> None:
        """Remove the earlier report's files (links themselves, never their targets) before writing anew."""
        self._create()
        for name in self._stale:
            target = self.path / name
            if target.is_symlink() or target.is_file():
                target.unlink()
        self._stale = []

    @contextlib.contextmanager
    def writing(self, name: str) -> Iterator[pathlib.Path]:
        """A temporary path in the folder to write ``name`` to; renamed to ``name`` when the block succeeds."""
        self._create()
        final = self.path / name
        temporary = temporary_file(self.path, prefix=f"{_OURS}{final.stem}-", suffix=f".tmp{final.suffix}")
        try:
            yield pathlib.Path(temporary)
            os.replace(temporary, final)  # replaces a link at ``final``, never writes through it
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self.written.append(final)

    def _create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"--out {self.path}: cannot create it ({error.strerror or error})")

    def write_text(self, name: str, text: str) -> pathlib.Path:
        with self.writing(name) as temporary:
            temporary.write_text(text, encoding="utf-8")
        return self.path / name
