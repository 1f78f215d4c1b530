"""Routing-consistency monitoring for PyTorch Lightning: :class:`LRCLightningCallback`.

Needs ``lightning`` (or the older ``pytorch_lightning``) besides transformers. Tested inside a real
``lightning.Trainer`` (tests/test_trainer_integrations.py).
"""

from __future__ import annotations

from typing import Optional

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as error:
        raise ImportError("LRCLightningCallback needs the `lightning` package (or `pytorch_lightning`): "
                          "pip install lightning") from error

from .._checks import check_int
from .callbacks import RoutingTap
from .monitor import RoutingMonitor


class LRCLightningCallback(Callback):
    """Logs routing-consistency metrics of the training batches with ``pl_module.log_dict``.

    Args:
        model_attribute: attribute of the LightningModule holding the Hugging Face MoE model (e.g.
            ``"model"`` for ``self.model = AutoModelForCausalLM...``); None records the LightningModule
            itself (only when it *is* the transformers model).
        log_every_n_steps: log (and, with ``reset_after_log``, reset) after every n-th optimizer step;
            default: the Trainer's ``log_every_n_steps``.
        monitor, per_layer, reset_after_log, stage, capture, every_n_batches, prefix, **monitor_kwargs: as in
            :class:`lrc_kernels.hf.LRCCallback` (one tap serves every ``fit``, so the sampling phase carries
            over).

    Every rank must run the same number of logging steps: the monitor is all-reduced across ranks before
    it is scored, so values are global and logged without ``sync_dist``.
    """

    def __init__(self, model_attribute: Optional[str] = "model", monitor: Optional[RoutingMonitor] = None, *,
                 log_every_n_steps: Optional[int] = None, per_layer: bool = False, reset_after_log: bool = True,
                 stage: Optional[str] = None, capture: str = "selected", every_n_batches: int = 1,
                 prefix: str = "lrc/", **monitor_kwargs):
        self.model_attribute = model_attribute
        self.log_every_n_steps = log_every_n_steps
        self.per_layer = per_layer
        self.prefix = prefix
        self._tap_arguments = dict(monitor=monitor, stage=stage, capture=capture, reset_after_log=reset_after_log,
                                   every_n_batches=check_int(every_n_batches, "every_n_batches", minimum=1),
                                   **monitor_kwargs)
        self.tap: Optional[RoutingTap] = None
        self._last_logged_step = 0

    @property
    def monitor(self) -> Optional[RoutingMonitor]:
        return None if self.tap is None else self.tap.monitor

    def on_train_start(self, trainer, pl_module) -> None:
        model = pl_module if self.model_attribute is None else getattr(pl_module, self.model_attribute)
        if self.tap is None:
            self.tap = RoutingTap(model, **self._tap_arguments)
        self.tap.open()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.log_every_n_steps or trainer.log_every_n_steps
        # Under gradient accumulation several batches end on the same optimizer step (and step 0 comes before
        # the first optimizer step); log once per step, after a step.
        if trainer.global_step % every == 0 and trainer.global_step != self._last_logged_step:
            self._last_logged_step = trainer.global_step
            summary = self.tap.log_window(per_layer=self.per_layer, prefix=self.prefix)
            if summary:
                pl_module.log_dict(summary, on_step=True, on_epoch=False, sync_dist=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.tap is not None:
            self.tap.close()


__all__ = ["LRCLightningCallback"]
