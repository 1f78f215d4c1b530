"""NVTX ranges of the ``lrc_kernels`` domain, for Nsight Systems; no-ops without the optional ``nvtx`` package."""

from __future__ import annotations

try:
    import nvtx as _nvtx

    _DOMAIN = _nvtx.get_domain("lrc_kernels")
except ImportError:  # NVTX ranges are an optional profiling aid
    _DOMAIN = None


class NvtxRange:
    """A reusable push/pop range: ``with NvtxRange("name"): ...``; its event attributes are built once."""

    def __init__(self, message: str):
        self._attributes = _DOMAIN.get_event_attributes(message=message) if _DOMAIN is not None else None

    def __enter__(self):
        if self._attributes is not None:
            _DOMAIN.push_range(self._attributes)
        return self

    def __exit__(self, *exc_info):
        if self._attributes is not None:
            _DOMAIN.pop_range()
