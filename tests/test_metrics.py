"""The confusion-matrix metrics against scikit-learn, the reference, on uneven random batches."""

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from project.metrics import ConfusionMatrix, format_report, per_class_scores, summarize


def random_batches(num_classes: int, seed: int, never: tuple[int, ...] = ()):
    """Batches of uneven size; classes in `never` appear neither as labels nor as predictions."""
    rng = np.random.default_rng(seed)
    allowed = np.array([c for c in range(num_classes) if c not in never])
    for size in rng.integers(1, 50, size=30):
        target = rng.choice(allowed, size=size)
        # Mostly right, so precision/recall are not all ~1/C.
        preds = np.where(rng.random(size) < 0.6, target, rng.choice(allowed, size=size))
        yield torch.from_numpy(preds), torch.from_numpy(target)


@pytest.mark.parametrize("never", [(), (3,), (0, 6)])
def test_matches_scikit_learn_exactly(never):
    num_classes = 7
    metric = ConfusionMatrix(num_classes)
    all_preds, all_target = [], []
    for preds, target in random_batches(num_classes, seed=len(never), never=never):
        metric.update(preds, target)
        all_preds.append(preds)
        all_target.append(target)
    y_pred, y_true = torch.cat(all_preds).numpy(), torch.cat(all_target).numpy()
    labels = list(range(num_classes))

    cm = metric.compute()
    np.testing.assert_array_equal(cm.numpy(), confusion_matrix(y_true, y_pred, labels=labels))

    scores = summarize(cm)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=0
    )
    assert scores["acc"] == accuracy_score(y_true, y_pred)
    assert scores["precision"] == precision
    assert scores["recall"] == recall
    assert scores["f1"] == f1

    per_class = per_class_scores(cm)
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    np.testing.assert_allclose(per_class["precision"].numpy(), p, rtol=0, atol=0)
    np.testing.assert_allclose(per_class["recall"].numpy(), r, rtol=0, atol=0)
    np.testing.assert_allclose(per_class["f1"].numpy(), f, rtol=0, atol=0)
    np.testing.assert_array_equal(per_class["support"].numpy(), support)


def test_rows_are_true_classes_columns_predictions():
    # The old template passed (y_pred, y_true) to scikit-learn: a transposed matrix.
    metric = ConfusionMatrix(3)
    metric.update(torch.tensor([2, 2]), torch.tensor([0, 0]))
    assert metric.compute()[0, 2] == 2
    assert metric.compute()[2, 0] == 0


def test_accepts_scores_and_resets():
    metric = ConfusionMatrix(3)
    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0]])
    metric.update(logits, torch.tensor([1, 2]))
    assert metric.compute().sum() == 2
    assert metric.compute()[1, 1] == 1 and metric.compute()[2, 0] == 1
    metric.reset()
    assert metric.compute().sum() == 0


def test_state_does_not_grow_with_batches():
    metric = ConfusionMatrix(10)
    for preds, target in random_batches(10, seed=1):
        metric.update(preds, target)
    assert [tuple(s.shape) for s in metric.metric_state.values()] == [(100,)]


def test_the_solvers_loss_over_uneven_batches_equals_scikit_learns_log_loss():
    """The Solver's epoch loss: the mean of per-sample cross-entropies, batch by batch, after a move to a device."""
    import torch.nn.functional as F
    from sklearn.metrics import log_loss

    from project.solver import Solver

    solver = Solver("classification", [str(c) for c in range(5)], "mlp", (1, 2, 2), [0.0], [1.0]).to("cpu")
    rng = np.random.default_rng(0)
    all_logits, all_labels = [], []
    for size in rng.integers(1, 40, size=20):
        logits, labels = (
            torch.from_numpy(rng.normal(size=(size, 5))).float(),
            torch.from_numpy(rng.integers(0, 5, size)),
        )
        solver.eval_loss.update(F.cross_entropy(logits, labels, reduction="none"))
        all_logits.append(logits)
        all_labels.append(labels)
    probabilities = torch.softmax(torch.cat(all_logits).double(), dim=1).numpy()
    expected = log_loss(torch.cat(all_labels).numpy(), probabilities, labels=list(range(5)))
    assert float(solver.eval_loss.compute()) == pytest.approx(expected, rel=1e-6)  # float32 cross-entropy


def test_report_names_classes_and_scores():
    cm = torch.tensor([[5, 1], [0, 4]])
    report = format_report(cm, ["cat", "dog"])
    assert "cat" in report and "dog" in report
    assert "0.9000" in report  # accuracy 9/10
    assert "No test samples" not in report


def test_report_says_which_classes_the_test_split_lacks_and_keeps_long_names_out_of_the_cells():
    """A class with no test samples lowers the macro averages (scikit-learn's default leaves it out): the report says
    so. A 120-character name heads its column by number, not as every cell's width."""
    from sklearn.metrics import f1_score

    long_name = "a" * 120
    cm = torch.tensor([[3, 0, 0], [0, 4, 0], [0, 0, 0]])
    report = format_report(cm, ["cat", long_name, "tiny"])
    assert "No test samples of tiny: the macro averages count each as 0" in report
    assert max(map(len, report.splitlines())) < 200 and f"1 {long_name}" in report
    y = [0, 0, 0, 1, 1, 1, 1]
    assert summarize(cm)["f1"] == pytest.approx(f1_score(y, y, labels=[0, 1, 2], average="macro", zero_division=0))


@pytest.mark.parametrize("outputs, center, spread", [(1, 150, 70), (3, 150, 70), (2, 1e8, 10)])
def test_regression_errors_over_uneven_batches_equal_scikit_learns(outputs, center, spread):
    from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error

    from project.tasks import Regression

    rng = np.random.default_rng(outputs)
    task = Regression([f"y{i}" for i in range(outputs)], target_mean=[center + 3.0] * outputs)  # a training mean
    metric, targets, predictions = task.metric(), [], []
    for size in rng.integers(1, 30, size=15):
        target = rng.normal(center, spread, size=(size, outputs))  # float64: float32 has 8 apart at 1e8
        predicted = target + rng.normal(0, spread / 2, size=(size, outputs))
        metric.update(torch.from_numpy(predicted), torch.from_numpy(target.squeeze(1) if outputs == 1 else target))
        targets.append(target)
        predictions.append(predicted)
    y, p = np.concatenate(targets).astype(np.float64), np.concatenate(predictions).astype(np.float64)
    scores = task.scores(metric.compute())
    assert scores["mae"] == pytest.approx(mean_absolute_error(y, p), rel=1e-12)
    assert scores["rmse"] == pytest.approx(root_mean_squared_error(y, p), rel=1e-12)
    assert scores["r2"] == pytest.approx(r2_score(y, p), rel=1e-12)


def test_r2_of_a_constant_target_is_finite_as_in_scikit_learn():
    from sklearn.metrics import r2_score

    from project.metrics import RegressionErrors

    for predicted in ([5.0, 5.0], [5.0, 6.0]):
        metric = RegressionErrors(1)
        metric.update(torch.tensor(predicted), torch.tensor([5.0, 5.0]))
        assert float(metric.compute()["r2"]) == r2_score([5.0, 5.0], predicted)


def test_a_class_name_the_font_lacks_is_drawn_without_a_warning(tmp_path):
    """An emoji in a class name: matplotlib draws a box and warned on stderr, naming a line of our source."""
    import warnings

    from project.tasks import Classification

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Classification(["cat", "ünï€ødé 🐍"]).draw_confusion(torch.tensor([[1, 0], [0, 1]]).numpy(), tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0
