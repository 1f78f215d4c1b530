"""Real framework integrations: a lightning.Trainer with LRCLightningCallback, TensorBoard event files written by
RoutingMonitor.log_to and by the transformers Trainer (report_to="tensorboard"), read back with TensorBoard's
own event reader. Logged values are compared with a RoutingMonitor fed the routing an independent witness saw."""

import pytest
import torch

from hf_models import build_tiny_model
from test_callbacks import MONITOR_ARGS, _PaddedTokens, _RouterWitness, _same, _train
from lrc_kernels.hf import LRCCallback, RoutingMonitor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scalars(log_dir):
    """{tag: [(step, value)]} of every scalar in the TensorBoard event files under log_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _as_float32(value):
    return float(torch.tensor(value, dtype=torch.float32))  # event files store scalars as float32


# ------------------------------------------------------------------------------------------------ Lightning

def lightning_example(model, train_loader, log_dir):
    """docs/monitoring.md's Lightning example (this function's body is the docs' code block)."""
    import lightning
    from lightning.pytorch.loggers import TensorBoardLogger

    from lrc_kernels.hf import LRCLightningCallback

    class MoEModule(lightning.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model                      # the Hugging Face MoE model

        def training_step(self, batch, batch_index):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    callback = LRCLightningCallback(model_attribute="model", seg_lens=(2, 4), cache_sizes_in_k=(1, 2))
    trainer = lightning.Trainer(max_steps=4, accumulate_grad_batches=2, log_every_n_steps=2,
                                accelerator="cpu", devices=1, callbacks=[callback],
                                logger=TensorBoardLogger(log_dir, name="", version=""),
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(MoEModule(model), train_loader)
    return callback


def test_lightning_trainer_logs_equal_a_monitor_on_the_same_routing(tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("tensorboard")
    model = build_tiny_model("mixtral").train()
    witness = _RouterWitness(model)
    loader = torch.utils.data.DataLoader(_PaddedTokens(), batch_size=2, shuffle=False)
    callback = lightning_example(model, loader, tmp_path)
    witness.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

    # 4 optimizer steps x 2 micro-batches; logged after steps 2 and 4, each window the 4 micro-batches since.
    assert len(witness.batches) == 8
    scalars = _scalars(tmp_path)
    lrc = {tag: points for tag, points in scalars.items() if tag.startswith("lrc/")}
    assert lrc and "lrc/srp@4" in lrc
    for window in range(2):
        expected = witness.monitor_over(witness.batches[4 * window:4 * window + 4], seg_lens=(2, 4),
                                        cache_sizes_in_k=(1, 2)).summary()
        logged = {tag: dict(points).get(2 * window + 1) for tag, points in lrc.items()}  # Lightning step = gs - 1
        assert set(logged) == set(expected), (sorted(logged), sorted(expected))
        assert all(logged[key] == _as_float32(expected[key]) for key in expected), (window, logged, expected)
    assert callback.monitor is not None


def test_lightning_callback_checks_every_n_batches_when_built():
    pytest.importorskip("lightning")
    from lrc_kernels.hf.lightning_callback import LRCLightningCallback

    with pytest.raises(ValueError, match="every_n_batches: expected an int >= 1, received 0"):
        LRCLightningCallback(every_n_batches=0)
    assert LRCLightningCallback(every_n_batches=4)._tap_arguments["every_n_batches"] == 4


# ----------------------------------------------------------------------------------------------- TensorBoard

def test_monitor_log_to_a_summary_writer_reads_back_tag_for_tag(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    generator = torch.Generator().manual_seed(3)
    names = [f"model.layers.{q}.mlp.gate" for q in range(3)]
    monitor = RoutingMonitor(num_experts=6, layer_names=names, **MONITOR_ARGS)
    for step in (1, 2):
        routing = {name: torch.rand(3, 11, 6, generator=generator).argsort(-1)[..., :2] for name in names}
        monitor.update(routing)
        with SummaryWriter(str(tmp_path)) as writer:
            written = monitor.log_to(writer, step, per_layer=True)
    scalars = _scalars(tmp_path)
    assert set(scalars) == set(written)
    assert all(scalars[key][-1] == (2, _as_float32(value)) for key, value in written.items())
    # Named as documented: lrc/{router name}/{metric} per layer, for every metric with a layer mean.
    metrics = {key[len("lrc/"):-len("/layer_mean")] for key in written if key.endswith("/layer_mean")}
    per_layer = {key for key in written if any(key.startswith(f"lrc/{name}/") for name in names)}
    assert metrics and per_layer == {f"lrc/{name}/{metric}" for name in names for metric in metrics}
    assert all(not key.startswith("lrc/model.") for key in set(written) - per_layer)


def test_hf_trainer_reports_lrc_keys_to_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # transformers 5's TensorBoard folder
    callback = LRCCallback(**MONITOR_ARGS)
    model, trainer, witness, reporter = _train(tmp_path, callback, max_steps=4, logging_steps=2,
                                               report_to="tensorboard")
    step_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    scalars = _scalars(tmp_path / "tb")
    # The Trainer's TensorBoard callback writes each log key as train/{key} at the global step.
    tags = {tag[len("train/"):]: points for tag, points in scalars.items() if tag.startswith("train/lrc/")}
    assert set(tags) == {key for key in step_logs[0] if key.startswith("lrc/")}
    assert len(tags) <= 50  # the documented cap of the default keys, whatever the number of layers
    for window, entry in enumerate(step_logs):
        expected = witness.monitor_over(witness.batches[2 * window:2 * window + 2], **MONITOR_ARGS).summary()
        assert all(_same(entry[key], expected[key]) for key in expected)
        assert all(dict(tags[key])[entry["step"]] == _as_float32(expected[key]) for key in expected)


def _doc_block(marker):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "monitoring.md").read_text()
    (block,) = [block for block in re.findall(r"```python\n(.*?)\n```", text, flags=re.S) if marker in block]
    return block


def test_docs_lightning_example_is_the_tested_code():
    import inspect
    import textwrap

    source = inspect.getsource(lightning_example).split('"""', 2)[2].split("\n", 1)[1]
    assert _doc_block("LRCLightningCallback(") == textwrap.dedent(source).strip()


def test_docs_tensorboard_example_runs_and_reads_back(tmp_path):
    pytest.importorskip("tensorboard")
    namespace = {"log_dir": str(tmp_path)}
    exec(compile(_doc_block("SummaryWriter(log_dir)"), "docs/monitoring.md", "exec"), namespace)
    written = namespace["written"]
    assert written and {tag: points[-1] for tag, points in _scalars(tmp_path).items()} == {
        key: (1, _as_float32(value)) for key, value in written.items()}
