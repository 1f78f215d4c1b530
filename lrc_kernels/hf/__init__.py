"""Live routing capture from Hugging Face transformers MoE models, and a training-loop monitor.

:func:`find_routers` lists a model's MoE routers; :class:`RoutingRecorder` records the experts each router
selects during a forward pass; :class:`RoutingMonitor` accumulates exact routing-consistency statistics
from recorded routing (it lives in :mod:`lrc_kernels.monitor`; this package re-exports it);
:class:`LRCCallback` wires both into the transformers ``Trainer``, :class:`LRCLightningCallback` into
Lightning (needs ``lightning``), and :class:`RoutingTap` into any loop.

Every name is loaded on first use. The capture names and the Trainer callback need transformers >= 5
(``pip install 'lrc-kernels[hf]'``); ``RoutingMonitor`` only consumes tensors and works without it.
"""

import importlib

_NEEDS_TRANSFORMERS = {"RouterSite": ".routers", "find_routers": ".routers", "RoutingRecorder": ".recorder",
                       "LRCCallback": ".callbacks", "RoutingTap": ".callbacks"}
# Also needs lightning, so it stays out of __all__: `from lrc_kernels.hf import *` must work without it.
_NEEDS_LIGHTNING = {"LRCLightningCallback": ".lightning_callback"}
_TENSORS_ONLY = {"RoutingMonitor": "lrc_kernels.monitor"}


def require_transformers() -> None:
    """Raise an ``ImportError`` naming the ``hf`` extra unless transformers >= 5 is importable.

    Example:
        >>> require_transformers()                     # silent: transformers >= 5 is installed
    """
    try:
        import transformers
    except ImportError as error:
        raise ImportError("lrc_kernels.hf needs the `transformers` package (version 5 or later); install the "
                          "`hf` extra: pip install 'lrc-kernels[hf]'") from error
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"lrc_kernels.hf needs transformers >= 5 (MoE blocks that call `experts(hidden, "
                          f"top_k_index, top_k_weights)`), found {transformers.__version__}; install the `hf` "
                          f"extra: pip install -U 'lrc-kernels[hf]'")


def __getattr__(name):
    if name in _NEEDS_TRANSFORMERS or name in _NEEDS_LIGHTNING:
        require_transformers()
        module_name = _NEEDS_TRANSFORMERS.get(name) or _NEEDS_LIGHTNING[name]
    elif name in _TENSORS_ONLY:
        module_name = _TENSORS_ONLY[name]
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module_name, __name__), name)


__all__ = sorted([*_NEEDS_TRANSFORMERS, *_TENSORS_ONLY, "require_transformers"])
