"""Readers of saved routing: our own files and the dumps of vLLM, SGLang and Megatron-Core (docs/formats.md).

Every reader returns one :class:`~lrc_kernels.RoutingTrace` per file or raises :class:`TraceReadError`, a
``ValueError`` whose one-line message names the file, the line or record and the field.

Example:
    >>> from lrc_kernels.io import ReadOptions, read_trace
    >>> trace = read_trace("responses.jsonl", "vllm", ReadOptions(num_experts=64, layers="1-47"))  # doctest: +SKIP
"""

from __future__ import annotations

import glob
import json
import pathlib
import zipfile
from typing import Iterable, List, Union

import numpy as np

from lrc_kernels.trace import RoutingTrace

from . import jsonl, lrc, megatron, sglang, sglang_dump, vllm
from ._common import (ReadOptions, TraceReadError, TraceReadWarning, json_problem, options_from_model_config,
                      parse_layer_spec)

READERS = {"lrc": lrc.read, "jsonl": jsonl.read, "vllm": vllm.read, "sglang": sglang.read,
           "sglang-dump": sglang_dump.read, "megatron": megatron.read}
FORMATS = ("auto",) + tuple(READERS)

__all__ = ["FORMATS", "ReadOptions", "TraceReadError", "TraceReadWarning", "detect_format", "expand_paths",
           "options_from_model_config", "parse_layer_spec", "read_trace"]


def _first_json_line(path: pathlib.Path):
    """``(record, problem)``: the first non-blank line's JSON value, or None and why it is not one; an empty
    file is an error."""
    try:
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        return json.loads(line), None
                    except (ValueError, RecursionError) as error:
                        return None, f"line {number} is not JSON: {json_problem(error)}"
    except OSError as error:
        return None, f"cannot read: {error.strerror}"
    raise TraceReadError(f"{path}: no routing records (the file is empty)")


def _pickle_mentions(path: pathlib.Path, names: Iterable[bytes]) -> bool:
    """Whether the pickle inside a (zip-format) torch.save file spells one of ``names`` (dict keys are stored
    as plain strings), without unpickling it."""
    try:
        with zipfile.ZipFile(path) as archive:
            member = next((name for name in archive.namelist() if name.endswith("data.pkl")), None)
            data = archive.read(member) if member else b""
    except (OSError, zipfile.BadZipFile, KeyError):
        return False
    return any(name in data for name in names)


def detect_format(path: Union[str, pathlib.Path]) -> str:
    """The format of ``path`` from its content (and suffix for binary files); see docs/formats.md.

    Returns:
        one of :data:`FORMATS` other than ``"auto"``.

    Raises:
        TraceReadError: naming the file, when neither its suffix nor its first record says the format.

    Example:
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = pathlib.Path(folder) / "routing.jsonl"
        ...     _ = path.write_text('{"seq": "a", "pos": 0, "experts": [3, 1]}')
        ...     detect_format(path)
        'jsonl'
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "lrc"
    if suffix == ".npy":
        return "vllm"
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                return "lrc" if "topk" in archive.files else "vllm"
        except (OSError, ValueError, EOFError):
            return "lrc"   # its reader reports why the file cannot be read
    if suffix in (".pt", ".pth"):
        return "sglang-dump" if _pickle_mentions(path, (b"topk_ids_of_layer", b"last_physical_to_logical_map")) \
            else "lrc"
    record, problem = _first_json_line(path)
    if isinstance(record, list) and record and isinstance(record[0], dict):
        return "sglang"
    if not isinstance(record, dict):
        problem = problem or "the first line is not a JSON object"
        raise TraceReadError(f"{path}: cannot recognise the format (not a tensor file, and {problem}); "
                             "pass --format")
    if "experts" in record and "pos" in record:
        return "jsonl"
    if megatron.looks_like(record):
        return "megatron"
    if "meta_info" in record or any(key in record for key in ("sglext", "sgl_ext")):
        return "sglang"
    choices = record.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        if any(key in choices[0] for key in ("sglext", "sgl_ext")):
            return "sglang"
        if "routed_experts" in choices[0] or "prompt_routed_experts" in record:
            return "vllm"
    raise TraceReadError(f"{path}: cannot recognise the format from the first record (keys: "
                         f"{', '.join(sorted(record)) or 'none'}); pass --format")


def read_trace(path: Union[str, pathlib.Path], format: str = "auto", options: ReadOptions = ReadOptions()
               ) -> RoutingTrace:
    """Read one file as a :class:`~lrc_kernels.RoutingTrace`.

    Args:
        path: the file.
        format: one of :data:`FORMATS`; ``"auto"`` recognises it from the content (:func:`detect_format`).
        options: what the file may not say (E, the layers to keep, SGLang's shape, Megatron's micro-batch).

    Returns:
        ``RoutingTrace`` with ``topk`` int32 ``[n_layers, S, T, k]`` (our trace files: as saved), ``lengths``,
        ``phase`` where the format marks prompt and generated tokens, and ``meta["source"]``/``["format"]``.

    Raises:
        TraceReadError: naming the file, the line or record and the field.

    Example:
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = pathlib.Path(folder) / "routing.jsonl"
        ...     _ = path.write_text('{"seq": "a", "pos": 0, "experts": [3, 1]}\\n'
        ...                         '{"seq": "a", "pos": 1, "experts": [2, 1]}\\n')
        ...     read_trace(path, options=ReadOptions(num_experts=4)).topk.tolist()
        [[[[3, 1], [2, 1]]]]
    """
    path = pathlib.Path(path)
    if format not in FORMATS:
        raise TraceReadError(f"--format: expected one of {', '.join(FORMATS)}, received {format!r}")
    if not path.exists():
        raise TraceReadError(f"{path}: no such file")
    if not path.is_file():
        raise TraceReadError(f"{path}: not a regular file")
    if format == "auto":
        format = detect_format(path)
    return READERS[format](path, options)


def expand_paths(specs: Iterable[Union[str, pathlib.Path]]) -> List[pathlib.Path]:
    """Files named by ``specs``: a file as is, a directory's files (sorted, hidden ones skipped), a glob's
    matches (sorted). A directory without files or a glob without matches is an error; duplicates are dropped.

    Example:
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     for name in ("b.jsonl", "a.jsonl", ".hidden"):
        ...         _ = (pathlib.Path(folder) / name).write_text("{}")
        ...     [path.name for path in expand_paths([folder, f"{folder}/a.*"])]
        ['a.jsonl', 'b.jsonl']
    """
    files: dict = {}
    for spec in specs:
        path = pathlib.Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not found:
                raise TraceReadError(f"{path}: a directory without files")
        elif not path.exists() and glob.has_magic(str(spec)):
            found = sorted(pathlib.Path(p) for p in glob.glob(str(spec)) if pathlib.Path(p).is_file())
            if not found:
                raise TraceReadError(f"{spec}: no file matches this pattern")
        else:
            found = [path]
        files.update((p, None) for p in found)
    return list(files)
