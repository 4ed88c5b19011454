"""Every model on every image shape gives one output per task output; the MLP takes feature vectors too; the registries
match the CLI's names."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from project import run
from project.data import DATASETS
from project.infra.errors import UserError
from project.model import MODELS, Standardize, backbone_options, build_model

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


def test_numpy_values_of_a_dataset_give_checkpoints_that_load_weights_only(tmp_path):
    # The natural way to write a dataset (`list(load_wine().target_names)`, `features.mean(0)`) gives numpy values;
    # a checkpoint holding them was refused by every weights-only read, after a whole run had trained.
    args = run.parse_args(["--exp-dir", str(tmp_path)])
    run.resolve_task(args)
    datamodule = DATASETS["digits"](**vars(args))
    datamodule.output_names = list(np.array([str(d) for d in range(10)]))
    datamodule.mean, datamodule.std = np.array([4.884]), tuple(np.array([6.017]))
    buffer = io.BytesIO()
    torch.save({"hyper_parameters": dict(run.build_solver(args, datamodule).hparams)}, buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)["hyper_parameters"]
    assert saved["output_names"][3] == "3" and saved["mean"] == [4.884] and saved["std"] == [6.017]

    datamodule.pixel_max = Path("16")  # anything a weights-only read refuses: one line before training, not after
    with pytest.raises(UserError, match=r"setting pixel_max = PosixPath\('16'\) \(PosixPath\)"):
        run.build_solver(args, datamodule)


def test_a_feature_that_never_varies_is_standardised_as_scikit_learns_scaler_does():
    """A column constant in the training split (std 0) is divided by 1, not by 0 (every loss NaN from step 1)."""
    from sklearn.preprocessing import StandardScaler

    x = np.array([[1.0, 5.0, 0.0], [3.0, 5.0, 2.0], [2.0, 5.0, 7.0]])
    ours = Standardize(x.mean(0).tolist(), x.std(0).tolist(), (3,))(torch.tensor(x, dtype=torch.float32))
    np.testing.assert_allclose(ours.numpy(), StandardScaler().fit(x).transform(x), rtol=1e-6, atol=1e-6)


def test_a_backbone_parameter_named_like_an_option_of_the_data_is_refused(monkeypatch):
    """A ViT's `image_size` received --image-size (64, the image folders' default) on 8x8 digits, silently."""

    def vit_like(input_shape, num_outputs: int, hidden_dim: int = 128, image_size: int = 8):
        return MODELS["mlp"](input_shape, num_outputs, hidden_dim)

    monkeypatch.setitem(MODELS, "vit-like", vit_like)
    with pytest.raises(UserError, match="--model vit-like: its parameter image_size is the data's option --image-size"):
        backbone_options("vit-like", {"hidden_dim": 16, "image_size": 64})
    assert backbone_options("mlp", {"hidden_dim": 16, "image_size": 64}) == {"hidden_dim": 16}
    monkeypatch.setitem(MODELS, "any", lambda input_shape, num_outputs, *args, **kwargs: vit_like(input_shape, 2))
    assert backbone_options("any", {"hidden_dim": 16}) == {}  # *args and **kwargs name no option
