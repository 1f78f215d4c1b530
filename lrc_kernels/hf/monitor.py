"""Compatibility alias: :class:`RoutingMonitor` lives in :mod:`lrc_kernels.monitor` (it consumes tensors only)."""

from lrc_kernels.monitor import RoutingMonitor

__all__ = ["RoutingMonitor"]
