"""What every reader shares: its options, its error, the layer selection and the assembly of a trace.

Readers turn an engine's records into per-sequence arrays ``[T_s, n_layers, k]`` (the layout vLLM and
SGLang return) and hand them to :func:`assemble`, which pads them into one ``[n_layers, S, T, k]`` int32
array with one copy per sequence (never a loop per token).
"""

from __future__ import annotations

import binascii
import json
import reprlib
import pathlib
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from lrc_kernels._checks import check_allocation
from lrc_kernels.trace import RoutingTrace


class TraceReadError(ValueError):
    """A file that cannot be read as the chosen format; the message names the file, the line or record and
    the field, e.g. ``"dump.jsonl:12: choices[0].routed_experts: invalid base64"``.

    Example:
        >>> try:
        ...     parse_layer_spec("1-x")
        ... except ValueError as error:
        ...     print(type(error).__name__, error)
        TraceReadError --layers '1-x': expected numbers and ranges like '1-47' or '1,3,5', received '1-x'
    """


class TraceReadWarning(UserWarning):
    """Something in a file that is probably a mistake but still gives a valid trace (a layer that is 0 for
    every token, an ambiguous stitching choice).

    Example:
        >>> import pathlib, tempfile, warnings
        >>> from lrc_kernels.io import read_trace
        >>> with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = (pathlib.Path(folder) / "zeros.jsonl").write_text('{"seq": 0, "pos": 0, "experts": [0]}')
        ...     _ = read_trace(pathlib.Path(folder) / "zeros.jsonl", options=ReadOptions(num_experts=4))
        >>> [warning.category.__name__ for warning in caught]
        ['TraceReadWarning']
    """


@dataclass(frozen=True)
class ReadOptions:
    """What the file itself may not say.

    Attributes:
        num_experts: routed experts E per layer (int, or one int per kept layer); required by every engine
            format except where the file knows (our ``.safetensors`` traces, SGLang's physical-to-logical map).
        layers: a layer SPEC (``"1-47"``, ``"1,3,5"``, ``"0-3,8"``) keeping those layer numbers, or None (all).
        num_layers, top_k: the shape of SGLang's raw int32 bytes, which carry no shape.
        micro_batch_size: B of Megatron's ``[s, b]`` token order.
        on_bytes: called with the number of bytes just read, every few MB of a JSON-lines file (a progress bar).

    Example:
        >>> import dataclasses
        >>> dataclasses.replace(ReadOptions(num_experts=64, layers="1-47"), top_k=8)
        ReadOptions(num_experts=64, layers='1-47', num_layers=None, top_k=8, micro_batch_size=None, on_bytes=None)
    """

    num_experts: Optional[Union[int, Tuple[int, ...]]] = None
    layers: Optional[str] = None
    num_layers: Optional[int] = None
    top_k: Optional[int] = None
    micro_batch_size: Optional[int] = None
    on_bytes: Optional[Callable[[int], None]] = None


_PROGRESS_STEP = 4 << 20   # bytes between two on_bytes calls: a bar moves without a call per line


# The keys Hugging Face configs use for these numbers, most common first.
_CONFIG_KEYS = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "top_k": ("num_experts_per_tok", "moe_topk", "num_experts_per_token", "top_k"),
    "num_experts": ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"),
}


def options_from_model_config(path: pathlib.Path, options: ReadOptions) -> ReadOptions:
    """``options`` with its unset ``num_layers``/``top_k``/``num_experts`` taken from a model's config.json.

    Example:
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = pathlib.Path(folder) / "config.json"
        ...     _ = path.write_text('{"num_hidden_layers": 48, "num_experts_per_tok": 8, "num_experts": 128}')
        ...     options = options_from_model_config(path, ReadOptions(top_k=2))
        >>> options.num_layers, options.top_k, options.num_experts
        (48, 2, 128)
    """
    try:
        config = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TraceReadError(f"{path}: cannot read as a JSON model config: {error}")
    if isinstance(config.get("text_config"), dict):  # multimodal configs nest the language model's
        config = {**config, **config["text_config"]}
    found = {}
    for name, keys in _CONFIG_KEYS.items():
        if getattr(options, name) is None:
            value = next((config[key] for key in keys if isinstance(config.get(key), int)), None)
            if value is not None:
                found[name] = value
    return replace(options, **found)


def parse_layer_spec(spec: str) -> list:
    """``"1-3,7"`` -> ``[1, 2, 3, 7]`` (ranges inclusive, order and duplicates as written are normalised).

    Raises:
        TraceReadError: naming the spec and the part that is not a number or a range of numbers >= 0.

    Example:
        >>> parse_layer_spec("7,1-3,2")
        [1, 2, 3, 7]
    """
    numbers = set()
    for part in spec.split(","):
        part = part.strip()
        low, dash, high = part.partition("-")
        try:
            first, last = (int(low), int(high)) if dash else (int(part), int(part))
        except ValueError:
            raise TraceReadError(f"--layers {spec!r}: expected numbers and ranges like '1-47' or '1,3,5', "
                                 f"received {part!r}")
        if first < 0 or last < first:
            raise TraceReadError(f"--layers {spec!r}: {part!r} is not a range of layer numbers >= 0")
        numbers.update(range(first, last + 1))
    return sorted(numbers)


def select_layers(numbers: Sequence[int], options: ReadOptions, source: str) -> list:
    """Indices into ``numbers`` (the file's layer numbers) that ``options.layers`` keeps."""
    if options.layers is None:
        return list(range(len(numbers)))
    wanted = parse_layer_spec(options.layers)
    position = {number: index for index, number in enumerate(numbers)}
    missing = [number for number in wanted if number not in position]
    if missing:
        raise TraceReadError(f"{source}: --layers {options.layers!r} names layer {missing[0]}, not in the file "
                             f"(layers: {_describe_numbers(numbers)})")
    return [position[number] for number in wanted]


def _describe_numbers(numbers: Sequence[int]) -> str:
    numbers = list(numbers)
    if len(numbers) > 1 and numbers == list(range(numbers[0], numbers[0] + len(numbers))):
        return f"{numbers[0]}-{numbers[-1]}"
    return ",".join(map(str, numbers))


def json_lines(path: pathlib.Path, *, lists: bool = False,
               on_bytes: Optional[Callable[[int], None]] = None) -> Iterator[Tuple[int, object]]:
    """``(line number, object)`` of every non-blank line; a line that is not a JSON object (or, with
    ``lists``, a list of objects: SGLang's batch responses) is an error. ``on_bytes`` hears of the bytes read."""
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise TraceReadError(f"{path}: cannot open: {error.strerror}")
    pending = 0
    with handle:
        for number, line in enumerate(handle, start=1):
            pending += len(line)
            if on_bytes is not None and pending >= _PROGRESS_STEP:
                on_bytes(pending)
                pending = 0
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as error:
                raise TraceReadError(f"{path}:{number}: invalid JSON{_truncated(line)}: {json_problem(error)}")
            if lists and isinstance(record, list) and all(isinstance(item, dict) for item in record):
                yield number, record
                continue
            if not isinstance(record, dict):
                raise TraceReadError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
            yield number, record
    if on_bytes is not None and pending:
        on_bytes(pending)


def _truncated(line: bytes) -> str:
    return " (a truncated last line?)" if not line.endswith(b"\n") else ""


def json_problem(error: Exception) -> str:
    """One line on why ``json.loads`` refused a line (malformed, not UTF-8, nested too deeply, huge int)."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} (column {error.colno})"
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 (byte 0x{error.object[error.start]:02x} at offset {error.start})"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    if "digits" in str(error):
        return "an integer of more than 4300 digits"
    return str(error).splitlines()[0]


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxstring, _BRIEF.maxlong, _BRIEF.maxother = 2, 8, 40, 40, 40


def brief(value) -> str:
    """A short ``repr`` for messages: a 10 MB list or a list nested 900 deep stays a few words."""
    return _BRIEF.repr(value)


def check_size(shape: Sequence[int], where: str, what: str, *, bytes_per_item: int = 8) -> None:
    """A :class:`TraceReadError` naming ``where`` (file and line) for an array this machine cannot hold."""
    try:
        check_allocation(shape, what, "the routing array", bytes_per_item=bytes_per_item)
    except ValueError as error:
        raise TraceReadError(f"{where}: {error}")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_field(record: dict, name: str, where: str, *, minimum: int = 0, required: bool = True):
    if name not in record:
        if required:
            raise TraceReadError(f"{where}: missing field '{name}'")
        return None
    value = record[name]
    if not is_int(value) or value < minimum:
        raise TraceReadError(f"{where}: '{name}' must be an integer >= {minimum}, found {brief(value)}")
    return value


def integer_array(value, where: str, field: str) -> np.ndarray:
    """A numpy integer array (signed or unsigned: engines store ids as uint8/uint16/int32), else an error."""
    array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.dtype.kind not in "iu":
        raise TraceReadError(f"{where}: '{field}' must hold integers, found dtype {array.dtype}")
    return array


@dataclass
class Sequences:
    """Per-sequence routing collected by a reader before :func:`assemble` pads it."""

    rows: list            # np.ndarray [T_s, n_layers, k] each, integer
    prompt_lengths: Optional[list] = None   # tokens of each row that are prompt (prefill); None = no phases


def assemble(sequences: Sequences, layer_numbers: Sequence[int], options: ReadOptions, source: str, *,
             num_experts=None, meta: Optional[dict] = None) -> RoutingTrace:
    """Pad ``sequences`` into a :class:`RoutingTrace` ``[kept layers, S, T, k]``, keep ``options.layers``.

    ``num_experts`` is the file's own E (used when ``options.num_experts`` is None); layers keep their numbers
    as names (``"layer 3"``). Warns about a kept layer whose ids are all 0 (vLLM fills dense layers with 0).
    """
    rows = sequences.rows
    if not rows:
        raise TraceReadError(f"{source}: no routing records")
    keep = select_layers(layer_numbers, options, source)
    num_slots = rows[0].shape[2]
    lengths = np.array([row.shape[0] for row in rows], dtype=np.int64)
    check_size((len(keep), len(rows), int(lengths.max(initial=0)), num_slots), source,
               "[layers, S, T, k]", bytes_per_item=4)
    # Every entry is written once (rows, then -1 past each row's end): np.full first would write it twice.
    topk = np.empty((len(keep), len(rows), int(lengths.max(initial=0)), num_slots), dtype=np.int32)
    full = len(keep) == len(layer_numbers)
    for s, row in enumerate(rows):
        # One strided copy per sequence: [T_s, layers, k] -> [layers, T_s, k].
        topk[:, s, : row.shape[0]] = (row if full else row[:, keep]).transpose(1, 0, 2)
        topk[:, s, row.shape[0]:] = -1
    kept_numbers = [layer_numbers[index] for index in keep]
    zero_layers = _warn_constant_zero(topk, kept_numbers, source)
    phase = None
    if sequences.prompt_lengths is not None:
        positions = np.arange(topk.shape[2])
        phase = torch.from_numpy((positions[None, :] >= np.asarray(sequences.prompt_lengths)[:, None])
                                 .astype(np.uint8))
    experts = options.num_experts if options.num_experts is not None else num_experts
    if experts is None:
        raise TraceReadError(f"{source}: the file does not say how many experts each layer has; "
                             "pass --num-experts (or --model-config)")
    try:
        return RoutingTrace(torch.from_numpy(topk), torch.from_numpy(lengths), num_experts=experts,
                            layer_names=[f"layer {number}" for number in kept_numbers], phase=phase,
                            meta={"source": str(source), **(meta or {})})
    except (ValueError, TypeError) as error:
        hint = f" (layer {_describe_numbers(zero_layers)} is all 0: keep only MoE layers with --layers)" \
            if zero_layers else ""
        raise TraceReadError(f"{source}: {error}{hint}")


def _warn_constant_zero(topk: np.ndarray, numbers: Sequence[int], source: str) -> list:
    """Warn about, and return, the layers whose largest id is 0: every routed token went to expert 0 (the
    padding past a row's length is -1, so it never hides an id)."""
    if topk.size == 0:
        return []
    zero = [number for number, largest in zip(numbers, topk.reshape(topk.shape[0], -1).max(axis=1)) if largest == 0]
    if zero:
        warnings.warn(f"{source}: layer {_describe_numbers(zero)} routes every token to expert 0 — dense layers "
                      f"the engine fills with 0? Keep only the MoE layers with --layers", TraceReadWarning,
                      stacklevel=3)
    return zero


def base64_bytes(value, where: str) -> bytes:
    """The bytes of a base64 string field (standard alphabet, padding required), else a one-line error."""
    if not isinstance(value, str):
        raise TraceReadError(f"{where}: expected a base64 string, found {type(value).__name__}")
    try:
        return binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError) as error:
        raise TraceReadError(f"{where}: invalid base64 ({error})")


def routing_rows(value, where: str, *, num_layers: Optional[int] = None, top_k: Optional[int] = None
                 ) -> np.ndarray:
    """A ``[T, n_layers, k]`` integer array from nested JSON lists (``-1`` kept as "no expert")."""
    if not isinstance(value, list):
        raise TraceReadError(f"{where}: expected nested lists [tokens][layers][k], found {type(value).__name__}")
    try:
        array = np.array(value, dtype=np.int64) if value else np.zeros((0, num_layers or 0, top_k or 0), np.int64)
    except (ValueError, TypeError, OverflowError):
        raise TraceReadError(f"{where}: not a [tokens, layers, k] array of integers (ragged or non-integer lists)")
    return check_rows(array, where, num_layers=num_layers, top_k=top_k)


def check_rows(array: np.ndarray, where: str, *, num_layers: Optional[int] = None,
               top_k: Optional[int] = None) -> np.ndarray:
    """``array`` if it is an integer ``[T, n_layers, k]`` array matching the expected layers and k."""
    if array.dtype.kind not in "iu":
        raise TraceReadError(f"{where}: expected integer expert ids, found dtype {array.dtype}")
    if array.ndim != 3:
        raise TraceReadError(f"{where}: expected shape [tokens, layers, k], found {list(array.shape)}")
    if num_layers is not None and array.shape[0] and array.shape[1] != num_layers:
        raise TraceReadError(f"{where}: {array.shape[1]} layers, but earlier records have {num_layers}")
    if top_k is not None and array.shape[0] and array.shape[2] != top_k:
        raise TraceReadError(f"{where}: k = {array.shape[2]} experts per token, but earlier records have {top_k}")
    return array
