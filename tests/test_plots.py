"""The suite's pictures say what they show (issue 15, plots): the group structure names fully
pruned groups and has a colorbar and integer channel ticks; bar charts start at 0; the sweep
title names the data set."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

import sgdet  # noqa: E402
from classification.config import get_defaults  # noqa: E402
from classification.datasets import dataset_label  # noqa: E402
from sgdet.visualize import group_structure_figure  # noqa: E402
from transfer.report import table_figure  # noqa: E402


def _lenet_with_an_empty_group():
    model = sgdet.models.lenet5(num_classes=10)
    sgdet.compress(model, conv_ratio=0.5, fc_ratio=0.5, groups=4, step=None, seed=0)
    layer = dict(model.named_modules())["features.3"]
    with torch.no_grad():             # prune group 1 of this layer entirely
        layer.mask[layer.group == 1] = False
        layer.zero_pruned_()
    assert layer.check_invariant() and (layer.group == 1).any()
    return model


def test_group_structure_names_fully_pruned_groups_and_has_a_colorbar():
    fig = group_structure_figure(_lenet_with_an_empty_group(), ["features.3", "classifier.1"])
    try:
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert texts.count("group 1: fully pruned") == 2          # both panels of features.3
        assert not any("group 0" in t for t in texts)
        colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert len(colorbars) == 2                                   # one per layer
        panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        for ax in panels:
            for axis in (ax.xaxis, ax.yaxis):
                assert isinstance(axis.get_major_locator(), MaxNLocator)
                ticks = [t for t in axis.get_majorticklocs() if t >= 0]
                assert all(float(t).is_integer() for t in ticks)
    finally:
        plt.close(fig)


def test_bar_chart_starts_at_zero():
    rows = [{"model": "A", "params": 1000, "flops": 2000, "top1": 88.0, "top5": 99.0},
            {"model": "B", "params": 500, "flops": 900, "top1": 86.5, "top5": 98.0}]
    fig = table_figure(rows, "t")
    try:
        assert fig.axes[0].get_ylim()[0] == 0
    finally:
        plt.close(fig)


def test_sweep_title_names_the_data_set():
    cfg = get_defaults().clone()
    cfg.DATA.NAME, cfg.DATA.ROOT = "imagenet", "/data/my_shapes/"
    assert dataset_label(cfg) == "my_shapes"
    cfg.DATA.NAME = "fashion-mnist"
    assert dataset_label(cfg) == "fashion-mnist"
