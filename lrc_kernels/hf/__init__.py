"""Live routing capture from Hugging Face transformers MoE models (optional extra: ``pip install lrc-kernels[hf]``).

:func:`find_routers` lists a model's MoE routers; :class:`RoutingRecorder` records the experts each router
selects during a forward pass. ``RoutingMonitor`` and ``LRCCallback`` are loaded lazily from
``lrc_kernels.hf.monitor`` and ``lrc_kernels.hf.callbacks``.
"""

import importlib
import importlib.util

try:
    import transformers
except ImportError as error:
    raise ImportError("lrc_kernels.hf needs the `transformers` package (version 5 or later); install the `hf` "
                      "extra: pip install 'lrc-kernels[hf]'") from error

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"lrc_kernels.hf needs transformers >= 5 (MoE blocks that call `experts(hidden, top_k_index, "
                      f"top_k_weights)`), found {transformers.__version__}; install the `hf` extra: "
                      f"pip install -U 'lrc-kernels[hf]'")

from .recorder import RoutingRecorder  # noqa: E402
from .routers import RouterSite, find_routers  # noqa: E402

_LAZY = {"RoutingMonitor": ".monitor", "LRCCallback": ".callbacks"}


def __getattr__(name):
    module_name = _LAZY.get(name)
    if module_name is None or importlib.util.find_spec(module_name, __name__) is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module_name, __name__), name)


__all__ = ["RouterSite", "RoutingRecorder", "find_routers",
           *(name for name, module in _LAZY.items() if importlib.util.find_spec(module, __name__) is not None)]
