"""Every model on every image shape gives one output per task output; the MLP takes feature vectors too; the registries
match the CLI's names."""

import pytest
import torch

from project import run
from project.data import DATASETS
from project.model import MODELS, backbone_options, build_model

SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32), "image-folder": (3, 64, 64)}


def build(model: str, shape: tuple[int, ...], outputs: int) -> torch.nn.Module:
    options = backbone_options(model, {"hidden_dim": 16})  # only the options this backbone takes
    return build_model(model, shape, outputs, [0.0] * shape[0], [1.0] * shape[0], **options)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("dataset, shape", sorted(SHAPES.items()))
@pytest.mark.parametrize("outputs", [1, 10])
def test_one_output_column_per_task_output(model, dataset, shape, outputs):
    result = build(model, shape, outputs)(torch.rand(3, *shape) * 255)
    assert result.shape == (3, outputs)
    assert result.dtype == torch.float32


def test_feature_vectors_take_the_mlp_and_the_cnn_says_it_takes_images():
    assert build("mlp", (10,), 1)(torch.randn(3, 10)).shape == (3, 1)
    with pytest.raises(ValueError, match="cnn takes images"):
        build("cnn", (10,), 1)


def test_mlp_logits_can_be_negative():
    # The old template put a ReLU on the logits, clipping them at zero.
    net = build_model("mlp", (1, 8, 8), 10, hidden_dim=32, mean=[0.0], std=[1.0])
    torch.manual_seed(0)
    assert (net(torch.randn(64, 1, 8, 8)) < 0).any()


def test_feature_vectors_are_standardised_per_feature():
    net = build_model("mlp", (3,), 1, mean=[1.0, 2.0, 3.0], std=[2.0, 4.0, 8.0], hidden_dim=4)
    standardize = net[0]
    assert torch.equal(standardize(torch.tensor([[3.0, 6.0, 11.0]])), torch.ones(1, 3))


def test_cli_names_match_the_registries():
    assert set(run.DATASET_NAMES) == set(DATASETS)
    assert set(run.MODEL_NAMES) == set(MODELS)
