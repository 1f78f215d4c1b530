"""Live routing-consistency monitoring inside the Hugging Face ``Trainer``: :class:`LRCCallback`.

The callback records every training forward pass of the model with a :class:`RoutingRecorder`, folds the
routing into a :class:`RoutingMonitor`, and on each ``on_log`` adds ``lrc/...`` keys to the Trainer's logs.
:class:`RoutingTap` is the framework-neutral part (recorder + monitor + log windows), shared with the
Lightning callback in :mod:`lrc_kernels.hf.lightning_callback`.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from transformers import TrainerCallback

from .._checks import check_int
from .monitor import RoutingMonitor
from .recorder import RoutingRecorder


def _check_monitor_arguments(monitor: Optional[RoutingMonitor], monitor_kwargs: dict) -> None:
    if monitor is not None and monitor_kwargs:
        raise ValueError(f"monitor_kwargs: pass either monitor= or RoutingMonitor arguments, received both "
                         f"(arguments {sorted(monitor_kwargs)})")


class RoutingTap:
    """Feeds the routing of every training-mode forward pass of ``model`` into a :class:`RoutingMonitor`.

    Between :meth:`open` and :meth:`close` a :class:`RoutingRecorder` hooks the model's routers, and a
    forward hook on ``model`` calls ``monitor.update(routing, lengths)`` after each call made with
    ``model.training`` true (evaluation forwards are skipped). Each forward pass is one monitor batch, so
    gradient-accumulation micro-batches are all counted. Recording adds no host synchronisation; the
    monitor's update runs its metric kernels on the routing's device.

    ``every_n_batches=n`` samples: only the training passes 0, n, 2n, ... (counted from the tap's creation)
    reach the monitor, so its metrics describe one batch in n and its update costs 1/n per step. The
    recorder stays hooked, so every pass still pays its hooks (they copy the attention mask and note each
    router's inputs; ``capture="logits_topk"`` takes each router's top-k), but a skipped pass is never
    read or scored. A log window that holds no sampled pass logs nothing.

    Args:
        model: the Hugging Face MoE model whose forward passes are recorded (the unwrapped model, not a
            DDP / accelerate wrapper: wrappers call it, so its hooks still fire).
        monitor: the monitor to feed. Default: ``RoutingMonitor.from_recorder(recorder, stage=stage,
            **monitor_kwargs)``, built in :meth:`open`.
        stage: the stack to monitor, ``"decoder"`` or ``"encoder"``; required for encoder-decoder models.
        capture: the recorder's ``capture`` (``"selected"`` or ``"logits_topk"``).
        reset_after_log: zero the monitor after every :meth:`log_window` (each log shows its own window);
            False accumulates over the whole run.
        every_n_batches: feed one training forward pass in this many to the monitor (int >= 1; default 1,
            every pass).
        **monitor_kwargs: arguments of :class:`RoutingMonitor` for the default monitor.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> from lrc_kernels.cli.analyze import DEFAULT_MODEL_DIR            # the bundled tiny MoE
        >>> model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR).train()
        >>> tap = RoutingTap(model, seg_lens=(4,), policies=("lru",), cache_sizes_in_k=(1,)); tap.open()
        >>> _ = model(input_ids=torch.tensor([[1, 2, 3, 4, 5]])); tap.close(); sorted(tap.log_window())
        ['lrc/hit@1k/lru', 'lrc/hit@1k/lru/layer_mean', 'lrc/srp@4', 'lrc/srp@4/layer_mean']
    """

    def __init__(self, model: nn.Module, monitor: Optional[RoutingMonitor] = None, *,
                 stage: Optional[str] = None, capture: str = "selected", reset_after_log: bool = True,
                 every_n_batches: int = 1, **monitor_kwargs):
        _check_monitor_arguments(monitor, monitor_kwargs)
        self.every_n_batches = check_int(every_n_batches, "every_n_batches", minimum=1)
        self.model = model
        self.monitor = monitor
        self.stage = stage
        self.capture = capture
        self.reset_after_log = reset_after_log
        self._monitor_kwargs = monitor_kwargs
        self._recorder: Optional[RoutingRecorder] = None
        self._hook = None
        self._training_passes = 0  # sampled or not, since creation: the sampling phase survives close/open
        self.batches_since_log = 0

    @property
    def is_open(self) -> bool:
        return self._recorder is not None

    def open(self) -> None:
        """Hook the model (builds the default monitor on first use)."""
        if self.is_open:
            raise RuntimeError("RoutingTap.open: already open; call close() first")
        recorder = RoutingRecorder(self.model, capture=self.capture)
        if self.monitor is None:
            self.monitor = RoutingMonitor.from_recorder(recorder, stage=self.stage, **self._monitor_kwargs)
        recorder.__enter__()
        self._recorder = recorder
        # Registered after the recorder's own model hook, so the recorder has closed the pass when it runs.
        self._hook = self.model.register_forward_hook(self._on_forward)

    def close(self) -> None:
        """Remove every hook (the monitor and its statistics are kept)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)
            self._recorder = None

    def _on_forward(self, module: nn.Module, args, output) -> None:
        if not module.training:
            return
        sampled = self._training_passes % self.every_n_batches == 0
        self._training_passes += 1
        if not sampled:
            return
        routing = self._recorder.routing()
        if not routing:
            return
        lengths = self._recorder.lengths()
        names = self.monitor.layer_names
        if names is not None:
            routing = {name: routing[name] for name in names if name in routing}
        first = next(iter(routing))
        self.monitor.update(routing, lengths[first])
        self.batches_since_log += 1

    def log_window(self, *, per_layer: bool = False, prefix: str = "lrc/") -> Dict[str, float]:
        """Summary of the batches since the last window, synced over ranks; empty if there were none.

        Under ``torch.distributed`` every rank must call it at the same point (the Trainer and Lightning
        log on every rank): the monitor's int64 state is all-reduced before :meth:`RoutingMonitor.compute`,
        so every rank returns the global values. Then the monitor is reset if ``reset_after_log``.

        Returns:
            ``{key: float}`` from :meth:`RoutingMonitor.summary` (``per_layer`` and ``prefix`` as there).
        """
        if self.batches_since_log == 0 or self.monitor is None:
            return {}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            with self.monitor.synced():
                summary = self.monitor.summary(per_layer=per_layer, prefix=prefix)
        else:
            summary = self.monitor.summary(per_layer=per_layer, prefix=prefix)
        if self.reset_after_log:
            self.monitor.reset()
        self.batches_since_log = 0
        return summary


class LRCCallback(TrainerCallback):
    """Adds routing-consistency metrics of the training batches to the ``Trainer`` logs.

    Every training forward pass is recorded (:class:`RoutingTap`); on each ``on_log`` that follows new
    batches the callback syncs the monitor across ranks, adds :meth:`RoutingMonitor.summary` keys to
    ``logs`` and to ``state.log_history[-1]``, and resets the monitor (``reset_after_log``). Default keys
    (at most 50 with the default monitor, whatever the number of layers): model-level ``lrc/srp@L`` and
    ``lrc/hit@{c}k/{policy}`` and their ``/layer_mean``; ``per_layer=True`` adds ``lrc/{layer}/...`` keys.

    Reporting callbacks (TensorBoard, wandb, ...) only see the keys if this callback runs before them:
    attach it with :meth:`install` (which puts it first) rather than ``Trainer(callbacks=[...])`` or
    ``trainer.add_callback``, which append it after the reporting callbacks.

    Args:
        monitor: a :class:`RoutingMonitor` to feed; default: one built from the model's routers with
            ``monitor_kwargs`` when training starts.
        per_layer: also log one key per layer and metric.
        reset_after_log: each log covers the batches since the previous log (True) or the whole run.
        stage, capture, every_n_batches: as in :class:`RoutingTap` (``every_n_batches=n`` monitors one
            training forward pass in n, a sample that cuts the monitor's cost per step by n; the count
            restarts at each ``train()``, which builds a new tap).
        prefix: key prefix.
        **monitor_kwargs: :class:`RoutingMonitor` arguments (``seg_lens``, ``policies``,
            ``cache_sizes_in_k``, ``num_bootstrap``, ...).

    Hooks are added in ``on_train_begin`` and removed in ``on_train_end``; if training raises, call
    :meth:`close`. The monitor stays readable after training (``callback.monitor``).

    Example (``LRCCallback(seg_lens=(4, 16)).install(trainer)`` in a training script; here the two calls
    ``Trainer.train()`` makes around a training step):
        >>> from transformers import AutoModelForCausalLM, TrainerControl, TrainerState
        >>> from lrc_kernels.cli.analyze import DEFAULT_MODEL_DIR            # the bundled tiny MoE
        >>> model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR).train()
        >>> callback, logs = LRCCallback(seg_lens=(4,), policies=("lru",), cache_sizes_in_k=(1,)), {"loss": 2.5}
        >>> callback.on_train_begin(None, TrainerState(), TrainerControl(), model=model)
        >>> _ = model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]))
        >>> callback.on_log(None, TrainerState(), TrainerControl(), logs=logs); callback.close(); sorted(logs)
        ['loss', 'lrc/hit@1k/lru', 'lrc/hit@1k/lru/layer_mean', 'lrc/srp@4', 'lrc/srp@4/layer_mean']
    """

    def __init__(self, monitor: Optional[RoutingMonitor] = None, *, per_layer: bool = False,
                 reset_after_log: bool = True, stage: Optional[str] = None, capture: str = "selected",
                 every_n_batches: int = 1, prefix: str = "lrc/", **monitor_kwargs):
        _check_monitor_arguments(monitor, monitor_kwargs)
        self.every_n_batches = check_int(every_n_batches, "every_n_batches", minimum=1)
        self.per_layer = per_layer
        self.reset_after_log = reset_after_log
        self.stage = stage
        self.capture = capture
        self.prefix = prefix
        self._monitor = monitor
        self._monitor_kwargs = monitor_kwargs
        self._tap: Optional[RoutingTap] = None

    @property
    def monitor(self) -> Optional[RoutingMonitor]:
        """The monitor being fed (None before the first training run when none was passed)."""
        return self._monitor

    def install(self, trainer) -> "LRCCallback":
        """Insert this callback first in ``trainer``'s callback list, ahead of the reporting integrations."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("LRCCallback: the Trainer passed no model to on_train_begin")
        self.close()
        self._tap = RoutingTap(model, self._monitor, stage=self.stage, capture=self.capture,
                               reset_after_log=self.reset_after_log, every_n_batches=self.every_n_batches,
                               **({} if self._monitor is not None else self._monitor_kwargs))
        self._tap.open()
        self._monitor = self._tap.monitor

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._tap is None or logs is None:
            return
        summary = self._tap.log_window(per_layer=self.per_layer, prefix=self.prefix)
        if not summary:
            return
        logs.update(summary)
        # Trainer.log appended a copy of `logs` to the history before calling the callbacks.
        if state.log_history:
            state.log_history[-1].update(summary)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Remove the hooks from the model (idempotent)."""
        if self._tap is not None:
            self._tap.close()
            self._tap = None


__all__ = ["LRCCallback", "RoutingTap"]
