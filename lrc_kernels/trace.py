"""RoutingTrace: the routing of a workload — every layer's experts for every token, saved as one file.

A trace is what the capture side (``lrc_kernels.hf``, the engine readers in ``lrc_kernels.io``) produces and
what the metrics consume: the ``[n_layers, S, T, k]`` expert ids with ``lengths`` and, for generated
workloads, a per-token phase (prompt or generated). It is plain tensors plus JSON metadata: no
transformers import, no device assumption.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ._checks import check_choice, check_int, check_int_tensor, check_lengths, check_topk
from ._files import set_plain_mode, temporary_file
from ._meta import merged_meta

PREFILL, DECODE = 0, 1
PHASES = ("all", "prefill", "decode")
METADATA_KEY = "lrc_kernels.trace"
FORMAT_VERSION = 1
# A safetensors header is JSON; anything claiming more than this is not one of our trace files.
_MAX_HEADER_BYTES = 100 << 20


@dataclass(eq=False)
class RoutingTrace:
    """The routing of a workload: which experts every MoE layer chose for every token.

    Args:
        topk: signed int ``[n_layers, S, T, k]`` expert ids, ``-1`` = no expert. Entries of sequence s at or
            beyond ``lengths[s]`` are neither read nor validated (SPEC §1). Kept as given (not copied).
        lengths: int ``[S]`` with values in ``[0, T]``; default ``T`` for every sequence. Stored as int64.
        num_experts: routed experts E of every layer (an int), or one int per layer.
        layer_names: one name per layer (e.g. the router modules' names); default ``layer0, layer1, ...``.
        phase: uint8 ``[S, T]`` or ``None``: 0 = prompt (prefill) token, 1 = generated (decode) token.
        meta: JSON-serialisable dict describing the workload (model, source, date, ...).

    Raises:
        TypeError / ValueError naming the field (``RoutingTrace.topk``, ``RoutingTrace.lengths``, ...).

    Example:
        >>> topk = torch.tensor([[[[0, 1], [1, 2], [2, 3]]]])          # 1 layer, 1 sequence, 3 tokens, top-2
        >>> trace = RoutingTrace(topk, num_experts=4, phase=torch.tensor([[0, 0, 1]], dtype=torch.uint8))
        >>> trace.select("decode").layer(0).tolist()
        [[[2, 3]]]
    """

    topk: torch.Tensor
    lengths: Optional[torch.Tensor] = None
    num_experts: Union[int, Sequence[int]] = 0
    layer_names: Optional[List[str]] = None
    phase: Optional[torch.Tensor] = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_int_tensor(self.topk, "RoutingTrace.topk")
        if self.topk.ndim != 4:
            raise ValueError(f"RoutingTrace.topk: expected a 4-D tensor [n_layers, S, T, k], received "
                             f"{self.topk.ndim}-D with shape {tuple(self.topk.shape)}")
        num_layers, num_seqs, num_tokens, _ = self.topk.shape
        self.num_experts = _check_num_experts(self.num_experts, num_layers)
        self.lengths = check_lengths(self.lengths, num_seqs, num_tokens, self.topk.device,
                                     name="RoutingTrace.lengths")
        experts = self.experts_per_layer
        if len(set(experts)) == 1:
            check_topk(self.topk, experts[0], name="RoutingTrace.topk", batched_rank=4, lengths=self.lengths)
        else:
            for index, layer_experts in enumerate(experts):
                check_topk(self.topk[index], layer_experts, name=f"RoutingTrace.topk[{index}]",
                           lengths=self.lengths)
        self.layer_names = _check_layer_names(self.layer_names, num_layers)
        self.phase = _check_phase(self.phase, self.lengths, num_seqs, num_tokens, self.topk.device)
        self.meta = _check_meta(self.meta)

    @property
    def n_layers(self) -> int:
        return self.topk.shape[0]

    @property
    def num_sequences(self) -> int:
        return self.topk.shape[1]

    @property
    def max_tokens(self) -> int:
        return self.topk.shape[2]

    @property
    def top_k(self) -> int:
        return self.topk.shape[3]

    @property
    def num_tokens(self) -> int:
        """Valid tokens over all sequences (the sum of ``lengths``)."""
        return int(self.lengths.sum())

    @property
    def experts_per_layer(self) -> Tuple[int, ...]:
        if isinstance(self.num_experts, int):
            return (self.num_experts,) * self.n_layers
        return tuple(self.num_experts)

    def experts(self, index: int) -> int:
        """E of layer ``index``.

        Example:
            >>> RoutingTrace(torch.zeros(2, 1, 3, 1, dtype=torch.long), num_experts=(4, 8)).experts(1)
            8
        """
        return self.experts_per_layer[index]

    def layer(self, index: int) -> torch.Tensor:
        """Layer ``index``'s routing, ``[S, T, k]`` (a view).

        Example:
            >>> RoutingTrace(torch.tensor([[[[0], [1]]], [[[1], [1]]]]), num_experts=2).layer(1).tolist()
            [[[1], [1]]]
        """
        return self.topk[index]

    def _replace(self, **fields) -> "RoutingTrace":
        values = dict(topk=self.topk, lengths=self.lengths, num_experts=self.num_experts,
                      layer_names=list(self.layer_names), phase=self.phase, meta=dict(self.meta))
        values.update(fields)
        return RoutingTrace(**values)

    def select(self, phase: str = "all") -> "RoutingTrace":
        """The prompt (``"prefill"``) or generated (``"decode"``) tokens of each sequence, as its own row.

        Row s of the result holds sequence s's tokens of that phase in order, from column 0; its length is
        their number (possibly 0). ``"all"`` returns the trace itself. ``meta["phase"]`` records the choice.

        Example:
            >>> topk = torch.tensor([[[[0], [1], [2], [-1]]]])
            >>> phase = torch.tensor([[0, 1, 1, 0]], dtype=torch.uint8)
            >>> t = RoutingTrace(topk, torch.tensor([3]), num_experts=3, phase=phase).select("decode")
            >>> t.layer(0).tolist(), t.lengths.tolist()
            ([[[1], [2]]], [2])
        """
        check_choice(phase, "phase", PHASES)
        if phase == "all":
            return self
        if self.phase is None:
            raise ValueError(f"phase: {phase!r} needs a trace with per-token phases (RoutingTrace.phase), "
                             "received a trace without them; only 'all' applies")
        wanted = PREFILL if phase == "prefill" else DECODE
        valid = torch.arange(self.max_tokens, device=self.topk.device) < self.lengths[:, None]
        keep = (self.phase == wanted) & valid                                   # [S, T]
        lengths = keep.sum(dim=1)
        width = int(lengths.max()) if self.num_sequences else 0
        rows, columns = keep.nonzero(as_tuple=True)
        destination = keep.cumsum(dim=1)[rows, columns] - 1
        topk = self.topk.new_full((self.n_layers, self.num_sequences, width, self.top_k), -1)
        topk[:, rows, destination] = self.topk[:, rows, columns]
        selected_phase = torch.full((self.num_sequences, width), wanted, dtype=torch.uint8,
                                    device=self.topk.device)
        return self._replace(topk=topk, lengths=lengths, phase=selected_phase, meta={**self.meta, "phase": phase})

    @staticmethod
    def concat(traces: Sequence["RoutingTrace"]) -> "RoutingTrace":
        """The sequences of several traces of the same model, in order (shorter rows padded with ``-1``).

        Layers, top-k, ``num_experts`` and ``layer_names`` must agree. The phase is kept when every trace has
        one. ``meta`` is :func:`lrc_kernels._meta.merged_meta` of the traces' metas: the entries all share and,
        when any differ, ``meta["parts"]``, each different meta in order.

        Example:
            >>> a = RoutingTrace(torch.tensor([[[[0], [1]]]]), num_experts=2)
            >>> RoutingTrace.concat([a, a]).lengths.tolist()
            [2, 2]
        """
        traces = list(traces)
        if not traces or not all(isinstance(t, RoutingTrace) for t in traces):
            raise TypeError(f"traces: expected a non-empty sequence of RoutingTrace, received "
                            f"{[type(t).__name__ for t in traces] or 'an empty sequence'}")
        first = traces[0]
        for index, other in enumerate(traces[1:], start=1):
            for name in ("n_layers", "top_k", "experts_per_layer", "layer_names"):
                if getattr(other, name) != getattr(first, name):
                    raise ValueError(f"traces[{index}].{name}: expected {getattr(first, name)!r} as in traces[0], "
                                     f"received {getattr(other, name)!r}")
        width = max(t.max_tokens for t in traces)
        topk = torch.cat([_pad_tokens(t.topk, width, -1, dim=2) for t in traces], dim=1)
        lengths = torch.cat([t.lengths.to(topk.device) for t in traces])
        phase = None
        if all(t.phase is not None for t in traces):
            phase = torch.cat([_pad_tokens(t.phase, width, PREFILL, dim=1).to(topk.device) for t in traces])
        return first._replace(topk=topk, lengths=lengths, phase=phase, meta=merged_meta([t.meta for t in traces]))

    def to(self, device) -> "RoutingTrace":
        """The same trace with its tensors on ``device``.

        Example:
            >>> RoutingTrace(torch.tensor([[[[0], [1]]]]), num_experts=2).to("cpu").lengths.device
            device(type='cpu')
        """
        phase = None if self.phase is None else self.phase.to(device)
        return self._replace(topk=self.topk.to(device), lengths=self.lengths.to(device), phase=phase)

    def save(self, path) -> None:
        """Write one ``.safetensors`` file: tensors ``topk``, ``lengths`` (and ``phase``), metadata in its header.

        The file is written under a temporary name in the same folder and renamed, so a failed save
        leaves no half-written file.

        Example:
            >>> import pathlib, tempfile
            >>> trace = RoutingTrace(torch.tensor([[[[0], [1]]]]), num_experts=2, meta={"model": "demo"})
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     trace.save(pathlib.Path(folder) / "routing.safetensors")
            ...     sorted(path.name for path in pathlib.Path(folder).iterdir())   # no temporary file left
            ['routing.safetensors']
        """
        from safetensors.torch import save_file

        path = pathlib.Path(path)
        tensors = {"topk": self.topk, "lengths": self.lengths}
        if self.phase is not None:
            tensors["phase"] = self.phase
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        header = {"format_version": FORMAT_VERSION, "num_experts": self.num_experts,
                  "layer_names": self.layer_names, "meta": self.meta}
        temporary = temporary_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            save_file(tensors, temporary, metadata={METADATA_KEY: json.dumps(header)})
            set_plain_mode(temporary)  # save_file writes a new file of mode 0600
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise

    @classmethod
    def load(cls, path) -> "RoutingTrace":
        """Read a file written by :meth:`save`, bit for bit.

        Raises:
            ValueError: naming the file and the field when it is not a trace file or a field is missing
            or ill-typed.

        Example:
            >>> import pathlib, tempfile
            >>> trace = RoutingTrace(torch.tensor([[[[0], [1]]]]), num_experts=2, meta={"model": "demo"})
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     trace.save(pathlib.Path(folder) / "routing.safetensors")
            ...     loaded = RoutingTrace.load(pathlib.Path(folder) / "routing.safetensors")
            >>> torch.equal(loaded.topk, trace.topk), loaded.meta
            (True, {'model': 'demo'})
        """
        path = pathlib.Path(path)
        header = _read_trace_header(path)
        if header is None:
            raise ValueError(f"{path}: not a RoutingTrace file (expected a .safetensors file with "
                             f"'{METADATA_KEY}' metadata, as written by RoutingTrace.save)")
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as archive:
                tensors = {name: archive.get_tensor(name) for name in archive.keys()}
        except Exception as error:  # safetensors raises its own error types for truncated or corrupt data
            raise ValueError(f"{path}: cannot read the trace's tensors: {error}".splitlines()[0]) from None
        for name in ("topk", "lengths"):
            if name not in tensors:
                raise ValueError(f"{path}: field '{name}': missing (found tensors {sorted(tensors)})")
        for name in ("num_experts", "layer_names", "meta"):
            if name not in header:
                raise ValueError(f"{path}: field '{name}': missing from the '{METADATA_KEY}' metadata")
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: field 'format_version': expected {FORMAT_VERSION}, "
                             f"received {header.get('format_version')!r}")
        num_experts = header["num_experts"]
        try:
            return cls(tensors["topk"], tensors["lengths"],
                       num_experts=tuple(num_experts) if isinstance(num_experts, list) else num_experts,
                       layer_names=header["layer_names"], phase=tensors.get("phase"), meta=header["meta"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None

    @staticmethod
    def read_meta(path) -> Optional[dict]:
        """The ``meta`` of a trace file (its header only, no tensors); ``None`` when ``path`` is not a trace.

        Example:
            >>> import pathlib, tempfile
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     path, other = pathlib.Path(folder) / "routing.safetensors", pathlib.Path(folder) / "notes.txt"
            ...     RoutingTrace(torch.tensor([[[[0]]]]), num_experts=1, meta={"model": "demo"}).save(path)
            ...     _ = other.write_text("not a trace")
            ...     RoutingTrace.read_meta(path), RoutingTrace.read_meta(other)
            ({'model': 'demo'}, None)
        """
        header = _read_trace_header(pathlib.Path(path))
        return None if header is None else header.get("meta")

    @staticmethod
    def is_trace_file(path) -> bool:
        """Whether ``path`` is a trace written by :meth:`save` (reads the header only).

        Example:
            >>> import pathlib, tempfile
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     path = pathlib.Path(folder) / "routing.safetensors"
            ...     RoutingTrace(torch.tensor([[[[0]]]]), num_experts=1).save(path)
            ...     RoutingTrace.is_trace_file(path), RoutingTrace.is_trace_file(pathlib.Path(folder) / "missing")
            (True, False)
        """
        try:
            return _read_trace_header(pathlib.Path(path)) is not None
        except ValueError:
            return False

    def __repr__(self) -> str:
        phase = "" if self.phase is None else ", with phases"
        return (f"RoutingTrace({self.n_layers} layers x {self.num_sequences} sequences x {self.max_tokens} "
                f"tokens, top-{self.top_k} of {self.num_experts} experts, {self.num_tokens} valid tokens{phase})")


def _read_trace_header(path: pathlib.Path) -> Optional[dict]:
    """The trace metadata of a safetensors file; ``None`` when the file is not a trace."""
    try:
        with open(path, "rb") as stream:
            prefix = stream.read(8)
            if len(prefix) < 8:
                return None
            (size,) = struct.unpack("<Q", prefix)
            if size > _MAX_HEADER_BYTES:
                return None
            raw = stream.read(size)
    except OSError as error:
        raise ValueError(f"{path}: cannot read: {error.strerror}") from None
    try:
        header = json.loads(raw)
        metadata = header.get("__metadata__") or {}
        text = metadata.get(METADATA_KEY)
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None
    if text is None:
        return None
    try:
        trace_header = json.loads(text)
    except ValueError:
        raise ValueError(f"{path}: field '{METADATA_KEY}': not valid JSON") from None
    if not isinstance(trace_header, dict):
        raise ValueError(f"{path}: field '{METADATA_KEY}': expected a JSON object")
    return trace_header


def _check_num_experts(num_experts, num_layers: int) -> Union[int, Tuple[int, ...]]:
    if isinstance(num_experts, (list, tuple)):
        if len(num_experts) != num_layers:
            raise ValueError(f"RoutingTrace.num_experts: expected an int or {num_layers} ints (one per layer), "
                             f"received {len(num_experts)} values")
        return tuple(check_int(e, "RoutingTrace.num_experts", minimum=1) for e in num_experts)
    return check_int(num_experts, "RoutingTrace.num_experts", minimum=1)


def _check_layer_names(layer_names, num_layers: int) -> List[str]:
    if layer_names is None:
        return [f"layer{index}" for index in range(num_layers)]
    names = list(layer_names) if isinstance(layer_names, (list, tuple)) else None
    if names is None or not all(isinstance(name, str) for name in names):
        raise TypeError(f"RoutingTrace.layer_names: expected a list of str, received {layer_names!r}")
    if len(names) != num_layers:
        raise ValueError(f"RoutingTrace.layer_names: expected {num_layers} names (one per layer), "
                         f"received {len(names)}")
    return names


def _check_phase(phase, lengths: torch.Tensor, num_seqs: int, num_tokens: int, device) -> Optional[torch.Tensor]:
    if phase is None:
        return None
    if not isinstance(phase, torch.Tensor) or phase.dtype != torch.uint8:
        kind = phase.dtype if isinstance(phase, torch.Tensor) else type(phase).__name__
        raise TypeError(f"RoutingTrace.phase: expected a torch.uint8 tensor [S, T] or None, received {kind}")
    if tuple(phase.shape) != (num_seqs, num_tokens):
        raise ValueError(f"RoutingTrace.phase: expected shape [S, T] = [{num_seqs}, {num_tokens}], "
                         f"received {list(phase.shape)}")
    phase = phase.to(device)
    valid = torch.arange(num_tokens, device=device) < lengths[:, None]
    bad = valid & (phase > DECODE)
    if bool(bad.any()):
        s, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"RoutingTrace.phase: expected 0 (prompt) or 1 (generated) for valid tokens, received "
                         f"{int(phase[s, t])} at index {(s, t)}")
    return phase


def _check_meta(meta) -> dict:
    if not isinstance(meta, dict):
        raise TypeError(f"RoutingTrace.meta: expected a dict of JSON values, received {type(meta).__name__}")
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"RoutingTrace.meta: expected a dict of JSON values, received one that JSON cannot "
                        f"hold ({error})") from None
    return meta


def _pad_tokens(tensor: torch.Tensor, width: int, fill: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_full(shape, fill)], dim=dim)
