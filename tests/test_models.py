"""Every model on every dataset shape gives one logit per class; the registries match the CLI's names."""

import pytest
import torch

from project import run
from project.data import DATASETS
from project.model import MODELS, build_model

SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32), "image-folder": (3, 64, 64)}


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("dataset, shape", sorted(SHAPES.items()))
@pytest.mark.parametrize("num_classes", [2, 10])
def test_logits_have_one_column_per_class(model, dataset, shape, num_classes):
    net = build_model(model, shape, num_classes, hidden_dim=16, mean=[0.0] * shape[0], std=[1.0] * shape[0])
    logits = net(torch.rand(3, *shape) * 255)
    assert logits.shape == (3, num_classes)
    assert logits.dtype == torch.float32


def test_mlp_logits_can_be_negative():
    # The old template put a ReLU on the logits, clipping them at zero.
    net = build_model("mlp", (1, 8, 8), 10, hidden_dim=32, mean=[0.0], std=[1.0])
    torch.manual_seed(0)
    assert (net(torch.randn(64, 1, 8, 8)) < 0).any()


def test_cli_names_match_the_registries():
    assert set(run.DATASET_NAMES) == set(DATASETS)
    assert set(run.MODEL_NAMES) == set(MODELS)
