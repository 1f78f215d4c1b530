"""The report plots scale from one layer to deep models: grid shape, streams shown, undefined SRP skipped."""

import pytest
import torch

import lrc_kernels as lk
from lrc_kernels.cli.output import OutputDir
from lrc_kernels.cli.plots import _columns, _streams, write_plots
from lrc_kernels.cli.report import qualify


@pytest.mark.parametrize("layers, columns", [(1, 1), (4, 4), (6, 3), (12, 4), (24, 6), (32, 8), (48, 8), (64, 8)])
def test_layer_grid_columns(layers, columns):
    assert _columns(layers) == columns


def test_layer_grid_has_no_hole_when_a_divisor_fits():
    for layers in range(5, 129):
        if any(layers % width == 0 for width in range(3, 9)):
            assert layers % _columns(layers) == 0, layers


def _results(num_layers, seg_lens=(2, 4, 4096)):
    generator = torch.Generator().manual_seed(num_layers)
    topk = torch.stack([torch.randperm(6, generator=generator)[:2] for _ in range(num_layers * 6 * 16)])
    trace = lk.RoutingTrace(topk.view(num_layers, 6, 16, 2), num_experts=6)
    results = lk.analyze(trace, seg_lens=seg_lens, num_bootstrap=20)
    qualify(results)
    return results


def test_one_layer_plots_no_model_stream():
    assert [label for label, _, _ in _streams(_results(1))] == ["layer 0"]
    assert [label for label, _, _ in _streams(_results(2))] == ["layer 0", "layer 1", "model"]


@pytest.mark.parametrize("num_layers", [1, 24])
def test_plots_are_written_for_one_and_many_layers_with_an_undefined_l(tmp_path, num_layers):
    results = _results(num_layers)
    assert results["model"]["srp"]["4096"]["best_f1"] is None  # L > T: not defined, left out of the plots
    out = OutputDir(tmp_path / "plots")
    paths = write_plots(results, 2, out, f"{num_layers} layers")
    assert [path.name for path in paths] == ["srp_vs_L.png", "cache_curves.png", "srp_heatmap.png"]
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in paths)
