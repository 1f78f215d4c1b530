"""Our own files: a :class:`~lrc_kernels.RoutingTrace` saved by ``RoutingTrace.save`` (``.safetensors`` that
knows its E, layer names and phases), and plain tensor files (``.npz``, ``.safetensors``, ``.pt``/``.pth``)
holding ``topk`` ``[S, T, k]`` or ``[layers, S, T, k]`` with optional ``lengths [S]`` and ``layers [n]``.

Plain tensor files accept the dtypes the API accepts (signed integers); E comes from ``--num-experts``.
"""

from __future__ import annotations

import pathlib
import pickle

import numpy as np
import torch

from lrc_kernels.trace import RoutingTrace

from ._common import ReadOptions, Sequences, TraceReadError, assemble, select_layers

TENSOR_SUFFIXES = (".npz", ".safetensors", ".pt", ".pth")


# What each tensor file starts with: .npz and torch.save's default format are zip archives (local file header
# or, empty, end of directory); torch.save's legacy format is a pickle (protocol byte 0x80).
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_PICKLE_MAGIC = b"\x80"


def _check_magic(path: pathlib.Path, suffix: str) -> None:
    """Say what a tensor file is not, instead of the reader's advice about pickles or a KeyError."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as error:
        raise TraceReadError(f"{path}: cannot open: {error.strerror}")
    if suffix == ".npz" and not head.startswith(_ZIP_MAGIC):
        raise TraceReadError(f"{path}: not an .npz archive (numpy.savez writes a zip file; this one starts with "
                             f"{head!r})")
    if suffix in (".pt", ".pth") and not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
        raise TraceReadError(f"{path}: not a torch.save file (neither a zip archive nor a pickle; it starts with "
                             f"{head!r})")


def _read_tensors(path: pathlib.Path) -> dict:
    suffix = path.suffix.lower()
    _check_magic(path, suffix)
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise TraceReadError(f"{path}: holds pickled Python objects other than tensors, which are not loaded "
                             "(save a tensor or a dict of tensors: torch.save({'topk': topk}, path))")
    except Exception as error:  # the readers raise many unrelated types on corrupt input
        raise TraceReadError(f"{path}: cannot read as {suffix[1:]}: {type(error).__name__}: {error}".splitlines()[0])
    if isinstance(loaded, torch.Tensor):
        return {"topk": loaded}
    if isinstance(loaded, dict):
        return loaded
    raise TraceReadError(f"{path}: expected a tensor or a dict with a 'topk' tensor, found {type(loaded).__name__}")


def _signed(value, path: pathlib.Path, key: str) -> np.ndarray:
    array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.dtype.kind != "i":
        raise TraceReadError(f"{path}: '{key}' must hold signed integers (int8/16/32/64, as the API accepts), "
                             f"found dtype {array.dtype}")
    return array


def read_tensor_file(path: pathlib.Path, options: ReadOptions) -> RoutingTrace:
    tensors = _read_tensors(path)
    if "topk" not in tensors:
        raise TraceReadError(f"{path}: no tensor named 'topk' (found: {', '.join(sorted(map(str, tensors))) or 'none'})")
    topk = _signed(tensors["topk"], path, "topk")
    if topk.ndim not in (3, 4):
        raise TraceReadError(f"{path}: 'topk' must have shape [S, T, k] or [layers, S, T, k], "
                             f"found shape {list(topk.shape)}")
    if 0 in topk.shape:
        raise TraceReadError(f"{path}: 'topk' of shape {list(topk.shape)} holds no routing (a zero-sized dimension)")
    if topk.ndim == 3:
        topk = topk[None]
    lengths = np.full(topk.shape[1], topk.shape[2], dtype=np.int64)
    if "lengths" in tensors:
        lengths = _signed(tensors["lengths"], path, "lengths")
        if list(lengths.shape) != [topk.shape[1]]:
            raise TraceReadError(f"{path}: 'lengths' must have shape [S] = [{topk.shape[1]}], "
                                 f"found {list(lengths.shape)}")
        bad = np.flatnonzero((lengths < 0) | (lengths > topk.shape[2]))
        if bad.size:
            raise TraceReadError(f"{path}: lengths[{bad[0]}] = {int(lengths[bad[0]])} is outside [0, T] = "
                                 f"[0, {topk.shape[2]}]")
    layers = list(range(topk.shape[0]))
    if "layers" in tensors:
        numbers = _signed(tensors["layers"], path, "layers")
        if list(numbers.shape) != [topk.shape[0]]:
            raise TraceReadError(f"{path}: 'layers' must have one entry per layer ({topk.shape[0]}), "
                                 f"found shape {list(numbers.shape)}")
        layers = numbers.tolist()
    rows = [topk[:, s, : int(lengths[s])].transpose(1, 0, 2) for s in range(topk.shape[1])]
    return assemble(Sequences(rows), layers, options, str(path), meta={"format": "lrc"})


def read_trace_file(path: pathlib.Path, options: ReadOptions) -> RoutingTrace:
    """A file written by ``RoutingTrace.save``; ``--layers`` picks layers by their index."""
    try:
        trace = RoutingTrace.load(path)
    except ValueError as error:
        raise TraceReadError(str(error))
    if options.num_experts is not None and tuple(trace.experts_per_layer) != tuple(
            [options.num_experts] * trace.n_layers if isinstance(options.num_experts, int) else options.num_experts):
        raise TraceReadError(f"{path}: the trace has num_experts {trace.num_experts}, --num-experts says "
                             f"{options.num_experts}; leave --num-experts out for trace files")
    keep = select_layers(list(range(trace.n_layers)), options, str(path))
    if len(keep) == trace.n_layers:
        return trace
    experts = trace.experts_per_layer
    return RoutingTrace(trace.topk[keep], trace.lengths, num_experts=tuple(experts[i] for i in keep),
                        layer_names=[trace.layer_names[i] for i in keep], phase=trace.phase, meta=trace.meta)


def read(path: pathlib.Path, options: ReadOptions) -> RoutingTrace:
    if path.suffix.lower() == ".safetensors" and RoutingTrace.is_trace_file(path):
        return read_trace_file(path, options)
    if path.suffix.lower() not in TENSOR_SUFFIXES:
        raise TraceReadError(f"{path}: format 'lrc' reads {', '.join(TENSOR_SUFFIXES)} files, "
                             f"found '{path.suffix or '(no suffix)'}'")
    return read_tensor_file(path, options)
