"""LRCCallback in a real transformers Trainer: logged values equal a RoutingMonitor fed the same routing."""

import math

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_models import build_tiny_model
from lrc_kernels.hf import LRCCallback, RoutingMonitor, RoutingTap

BATCH, SEQ_LEN, NUM_LAYERS, NUM_EXPERTS, TOP_K = 4, 12, 2, 6, 2
MONITOR_ARGS = dict(seg_lens=(2, 4), policies=("sch", "lru", "lfu", "belady"), cache_sizes_in_k=(1, 2, 4))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _PaddedTokens(torch.utils.data.Dataset):
    """16 right-padded sequences of 5..12 tokens (pad id 0, attention mask 0 on padding)."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 64, (16, SEQ_LEN), generator=generator)
        self.lengths = torch.randint(5, SEQ_LEN + 1, (16,), generator=generator)
        self.mask = (torch.arange(SEQ_LEN) < self.lengths[:, None]).long()
        self.ids = self.ids * self.mask

    def __len__(self):
        return 16

    def __getitem__(self, index):
        labels = self.ids[index].masked_fill(self.mask[index] == 0, -100)
        return {"input_ids": self.ids[index], "attention_mask": self.mask[index], "labels": labels}


class _RouterWitness:
    """Independent capture: each router's own top-k indices (output 2 of MixtralTopKRouter), padding -> -1."""

    def __init__(self, model):
        self.batches = []  # per training forward: ([int64 [B, T, k]] per layer, int64 lengths [B])
        self._mask = None
        self._layers = []
        self._handles = [model.register_forward_pre_hook(self._on_model_call, with_kwargs=True)]
        for layer in model.model.layers:
            self._handles.append(layer.mlp.gate.register_forward_hook(self._on_router_return))

    def _on_model_call(self, module, args, kwargs):
        self._mask = kwargs["attention_mask"] if module.training else None
        self._layers = []
        if self._mask is not None:
            self.batches.append((self._layers, self._mask.sum(1)))

    def _on_router_return(self, module, args, output):
        if self._mask is not None:
            indices = output[2].detach().view(*self._mask.shape, TOP_K)
            self._layers.append(indices.masked_fill(self._mask[..., None] == 0, -1))

    def remove(self):
        for handle in self._handles:
            handle.remove()

    @staticmethod
    def monitor_over(batches, **kwargs):
        names = [f"model.layers.{q}.mlp.gate" for q in range(NUM_LAYERS)]
        monitor = RoutingMonitor(num_experts=NUM_EXPERTS, layer_names=names, **kwargs)
        for layers, lengths in batches:
            monitor.update(layers, lengths)
        return monitor


class _KeysSeen(TrainerCallback):
    """Stands in for a reporting integration (TensorBoard, wandb): records what on_log hands it."""

    def __init__(self):
        self.logged = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append(dict(logs))


def _train(tmp_path, callback, *, max_steps, logging_steps, accumulation=1, report_to="none"):
    model = build_tiny_model("mixtral").train()
    witness = _RouterWitness(model)
    reporter = _KeysSeen()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, logging_steps=logging_steps,
                             per_device_train_batch_size=BATCH, gradient_accumulation_steps=accumulation,
                             report_to=report_to, use_cpu=True, save_strategy="no", seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_PaddedTokens(), callbacks=[reporter])
    callback.install(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    witness.remove()
    return model, trainer, witness, reporter


def _same(a, b):
    return a == b or (math.isnan(a) and math.isnan(b))


def test_trainer_logs_window_summaries_equal_to_a_monitor_on_the_same_routing(tmp_path):
    callback = LRCCallback(**MONITOR_ARGS)
    model, trainer, witness, reporter = _train(tmp_path, callback, max_steps=4, logging_steps=2)

    # Every module's hooks are gone after training (the witness removed its own).
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert len(witness.batches) == 4

    step_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in step_logs] == [2, 4]
    # 5 caches (sch@2, sch@4, lru, lfu, belady), model level and layer mean, at the reported sizes: layer
    # level m = 2, 4 (m = 8 > E = 6 has no value), model level m = 4, 8 (m = 16 > n·E = 12 is omitted).
    caches = ("sch@2", "sch@4", "lru", "lfu", "belady")
    expected_keys = {f"lrc/srp@{L}{suffix}" for L in (2, 4) for suffix in ("", "/layer_mean")}
    expected_keys |= {f"lrc/hit@{c}k/{name}{suffix}" for c in (1, 2) for name in caches
                      for suffix in ("", "/layer_mean")}
    for window, entry in enumerate(step_logs):
        lrc = {key: value for key, value in entry.items() if key.startswith("lrc/")}
        assert set(lrc) == expected_keys
        assert all(0.0 <= value <= 1.0 for value in lrc.values())
        # Each window resets the monitor: window w covers training forwards 2w and 2w+1.
        expected = witness.monitor_over(witness.batches[2 * window:2 * window + 2], **MONITOR_ARGS).summary()
        assert set(expected) == expected_keys
        assert all(_same(lrc[key], expected[key]) for key in expected), (lrc, expected)
        # The reporting callback ran after LRCCallback, so it saw the same keys and values.
        reported = reporter.logged[window]
        assert all(_same(reported[key], lrc[key]) for key in lrc)
    final = trainer.state.log_history[-1]
    assert "train_runtime" in final and not any(key.startswith("lrc/") for key in final)


def test_cumulative_per_layer_logging_counts_every_accumulated_micro_batch(tmp_path):
    callback = LRCCallback(per_layer=True, reset_after_log=False, model_level=False, **MONITOR_ARGS)
    model, trainer, witness, _ = _train(tmp_path, callback, max_steps=2, logging_steps=1, accumulation=2)

    assert len(witness.batches) == 4  # 2 optimizer steps x 2 micro-batches
    dataset = _PaddedTokens()
    seen = torch.cat([lengths for _, lengths in witness.batches])
    references = callback.monitor.compute()["references"]
    assert references.tolist() == [int(seen.sum()) * TOP_K] * NUM_LAYERS
    assert sorted(seen.tolist()) == sorted(dataset.lengths.tolist())  # 16 sequences seen once each

    names = callback.monitor.layer_names
    assert names == [f"model.layers.{q}.mlp.gate" for q in range(NUM_LAYERS)]
    last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    expected = witness.monitor_over(witness.batches, model_level=False, **MONITOR_ARGS).summary(per_layer=True)
    lrc = {key: value for key, value in last.items() if key.startswith("lrc/")}
    assert set(lrc) == set(expected)
    # Per layer: 2 SRP + 5 caches x 2 reported sizes = 12 keys, for each of 2 layers, plus 12 layer means.
    assert len(lrc) == 36
    assert all(_same(lrc[key], expected[key]) for key in expected)
    assert f"lrc/{names[1]}/srp@4" in lrc and "lrc/srp@4" not in lrc  # no model level requested
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_routing_tap_skips_eval_forwards_and_removes_its_hooks():
    model = build_tiny_model("mixtral")
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    tap = RoutingTap(model, **MONITOR_ARGS)
    tap.open()
    with pytest.raises(RuntimeError, match="already open"):
        tap.open()
    model.eval()
    model(input_ids=ids)
    assert tap.batches_since_log == 0 and tap.log_window() == {}
    model.train()
    model(input_ids=ids)
    model(input_ids=ids)
    assert tap.batches_since_log == 2
    summary = tap.log_window()
    assert tap.batches_since_log == 0 and 0.0 <= summary["lrc/srp@4"] <= 1.0
    assert int(tap.monitor.compute()["references"].sum()) == 0  # reset after the window
    tap.close()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    model(input_ids=ids)
    assert tap.batches_since_log == 0


def test_monitor_and_monitor_arguments_are_exclusive():
    with pytest.raises(ValueError, match="either monitor= or RoutingMonitor arguments"):
        LRCCallback(RoutingMonitor(num_experts=4), seg_lens=(2,))


def test_sampling_logs_a_monitor_fed_every_nth_training_forward_across_accumulated_micro_batches(tmp_path):
    # 3 optimizer steps x 2 micro-batches = training forwards 0..5; every_n_batches=2 feeds 0, 2, 4, and
    # the cumulative log after the last step covers exactly those.
    callback = LRCCallback(reset_after_log=False, every_n_batches=2, **MONITOR_ARGS)
    _, trainer, witness, _ = _train(tmp_path, callback, max_steps=3, logging_steps=3, accumulation=2)

    assert len(witness.batches) == 6
    sampled = witness.batches[0::2]
    seen = torch.cat([lengths for _, lengths in sampled])
    assert callback.monitor.compute()["references"].tolist() == [int(seen.sum()) * TOP_K] * NUM_LAYERS
    expected = witness.monitor_over(sampled, **MONITOR_ARGS).summary()
    last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    lrc = {key: value for key, value in last.items() if key.startswith("lrc/")}
    assert set(lrc) == set(expected)
    assert all(_same(lrc[key], expected[key]) for key in expected)
    unsampled = witness.monitor_over(witness.batches[1::2], **MONITOR_ARGS).summary()
    assert any(not _same(lrc[key], unsampled[key]) for key in expected)  # the sample, not the other half


def test_routing_tap_sampling_counts_training_forwards_only_and_keeps_its_phase_across_close():
    model = build_tiny_model("mixtral")
    ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    tap = RoutingTap(model, every_n_batches=3, reset_after_log=False, **MONITOR_ARGS)

    def training_pass(index):  # pass i has 4 + i tokens, so the monitor's reference count names the passes fed
        model.train()
        model(input_ids=ids[:, :4 + index])

    tap.open()
    training_pass(0)                          # fed
    model.eval()
    model(input_ids=ids)                      # evaluation: neither fed nor counted
    training_pass(1)
    assert tap.batches_since_log == 1
    tap.close()                               # mid-phase: a count restarted by open() would feed pass 2
    tap.open()
    training_pass(2)
    training_pass(3)                          # fed: the phase runs on across close / open
    training_pass(4)
    tap.close()
    assert tap.batches_since_log == 2
    per_layer = 2 * (4 + 0 + 4 + 3) * TOP_K   # batch 2, passes 0 and 3
    assert tap.monitor.compute()["references"].tolist() == [per_layer] * NUM_LAYERS


@pytest.mark.parametrize("value, error", [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)])
def test_every_n_batches_must_be_a_positive_int(value, error):
    model = build_tiny_model("mixtral")
    with pytest.raises(error, match="every_n_batches"):
        RoutingTap(model, every_n_batches=value)
    with pytest.raises(error, match="every_n_batches"):
        LRCCallback(every_n_batches=value)
