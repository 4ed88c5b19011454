"""DataModules: shapes, dtypes, splits, real on-disk formats, sharding, and the clear missing-data error."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import register_cifar10_like, write_cifar10_like, write_image_folder, write_mnist_like

from project.data import DATASETS
from project.infra.batches import EpochBatches
from project.infra.errors import UserError


def setup_module_data(name: str, data_dir: Path | str = "data", **kwargs):
    datamodule = DATASETS[name](data_dir=str(data_dir), batch_size=8, num_workers=0, **kwargs)
    datamodule.setup("fit")
    return datamodule


def split_labels_and_pixels(datamodule) -> dict[str, set]:
    """Each split's samples as hashable (pixels, label) pairs, to check disjointness and coverage."""
    return {
        name: {(x.numpy().tobytes(), int(y)) for x, y in zip(images, labels, strict=True)}
        for name, (images, labels) in datamodule.splits.items()
    }


def test_digits_split_is_stratified_disjoint_covering_and_seeded():
    datamodule = setup_module_data("digits", seed=3)
    sizes = datamodule.split_sizes
    assert sum(sizes.values()) == 1797
    assert sizes["train"] == pytest.approx(0.8 * 1797, abs=1)
    assert sizes["val"] == pytest.approx(0.1 * 1797, abs=2) and sizes["test"] == pytest.approx(0.1 * 1797, abs=2)
    images, labels = datamodule.splits["train"]
    assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == datamodule.input_shape == (1, 8, 8)
    assert labels.dtype == torch.long
    # Stratified: every class keeps about the same share in every split.
    for _, split_labels in datamodule.splits.values():
        shares = np.bincount(split_labels.numpy(), minlength=10) / len(split_labels)
        assert np.all(np.abs(shares - 0.1) < 0.02)
    # Disjoint and covering: the splits together are the dataset, as a multiset (digits has duplicates).
    from collections import Counter

    from sklearn.datasets import load_digits

    digits = load_digits()
    everything = Counter(
        (x.astype(np.uint8).tobytes(), int(y)) for x, y in zip(digits.images, digits.target, strict=True)
    )
    parts = Counter(
        (x.numpy().tobytes(), int(y))
        for images, labels in datamodule.splits.values()
        for x, y in zip(images, labels, strict=True)
    )
    assert parts == everything
    same = setup_module_data("digits", seed=3)
    other = setup_module_data("digits", seed=4)
    for name in ("train", "val", "test"):
        assert torch.equal(same.splits[name][0], datamodule.splits[name][0])
    assert not torch.equal(other.splits["test"][0], datamodule.splits["test"][0])


@pytest.mark.parametrize(
    "name, folder, shape",
    [("mnist", "MNIST", (1, 28, 28)), ("fashion-mnist", "FashionMNIST", (1, 28, 28)), ("cifar10", None, (3, 32, 32))],
)
def test_torchvision_datasets_read_their_real_file_formats(tmp_path, monkeypatch, name, folder, shape):
    if folder:
        write_mnist_like(tmp_path, folder, n_train=60, n_test=20)
    else:
        register_cifar10_like(monkeypatch, write_cifar10_like(tmp_path, per_batch=20, n_test=20))
    datamodule = setup_module_data(name, tmp_path, val_fraction=0.2)
    assert datamodule.input_shape == shape and len(datamodule.output_names) == 10
    train_size = 60 if folder else 100
    assert datamodule.split_sizes == {"train": train_size * 4 // 5, "val": train_size // 5, "test": 20}
    pairs = split_labels_and_pixels(datamodule)
    assert not pairs["train"] & pairs["val"]
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.dtype == torch.uint8 and tuple(images.shape) == (8, *shape) and labels.dtype == torch.long


def test_cifar10_pixels_keep_their_channel_layout(tmp_path, monkeypatch):
    written = write_cifar10_like(tmp_path, per_batch=10, n_test=10)
    register_cifar10_like(monkeypatch, written)
    raw = written.batches["test_batch"]["data"][0]  # 1,024 red, then green, then blue, row by row
    datamodule = setup_module_data("cifar10", tmp_path)
    first = datamodule.splits["test"][0][0]  # the test split keeps the file's order
    assert torch.equal(first, torch.from_numpy(raw.reshape(3, 32, 32).copy()))


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_missing_dataset_names_the_missing_files(tmp_path, name):
    datamodule = DATASETS[name](data_dir=str(tmp_path / "empty"))
    with pytest.raises(UserError) as error:
        datamodule.prepare_data()
    message = str(error.value)
    assert "missing" in message and str(tmp_path / "empty") in message
    assert "\n" not in message


def test_val_fraction_is_vals_share_of_data_without_a_test_split_and_the_default_split_stays(tmp_path):
    """A tenth is the test split; --val-fraction is val's share of all (of train/ where the data splits it off)."""
    from sklearn.datasets import load_digits

    from project.data import stratified_split

    labels = load_digits().target  # the split before --val-fraction counted here: 20% held out, halved
    train, held_out = stratified_split(labels, 0.2, 0)
    val, test = stratified_split(labels[held_out], 0.5, 0)
    default = setup_module_data("digits")
    for name, index in {"train": train, "val": held_out[val], "test": held_out[test]}.items():
        assert torch.equal(default.splits[name][1], torch.as_tensor(labels[index])), name
    for name, total in (("digits", 1797), ("diabetes", 442)):
        sizes = setup_module_data(name, val_fraction=0.3).split_sizes
        assert sizes["val"] == pytest.approx(0.3 * total, abs=1) and sizes["test"] == pytest.approx(0.1 * total, abs=1)
    write_image_folder(tmp_path / "pets", per_class=20)
    assert setup_module_data("image-folder", tmp_path / "pets", image_size=8).split_sizes == {"test": 4, "val": 4,
                                                                                              "train": 32}  # fmt: skip
    assert setup_module_data("image-folder", tmp_path / "pets", image_size=8, val_fraction=0.3).split_sizes == {
        "test": 4, "val": 12, "train": 24}  # fmt: skip
    with pytest.raises(UserError, match="--val-fraction 0.9: a tenth of the data is the test split"):
        setup_module_data("digits", val_fraction=0.9)
    for tiny in (1e-7, 0.001):  # nothing held out, or an empty validation split
        with pytest.raises(UserError, match=f"--val-fraction {tiny}: (too small|leaves no sample)"):
            setup_module_data("diabetes", val_fraction=tiny)


def test_image_folder_reads_pngs_and_splits(tmp_path):
    write_image_folder(tmp_path / "pets", classes=("cat", "dog", "fox"), per_class=10, size=12)
    datamodule = setup_module_data("image-folder", tmp_path / "pets", image_size=16)
    assert datamodule.output_names == ["cat", "dog", "fox"]
    assert datamodule.input_shape == (3, 16, 16)
    assert sum(datamodule.split_sizes.values()) == 30 and datamodule.split_sizes["test"] == 3
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == (3, 16, 16)
    assert set(labels.tolist()) <= {0, 1, 2}


def test_image_folder_with_given_splits(tmp_path):
    for split, n in (("train", 8), ("test", 3)):
        write_image_folder(tmp_path / "pets" / split, per_class=n, size=8)
    datamodule = setup_module_data("image-folder", tmp_path / "pets", image_size=8, val_fraction=0.25)
    assert datamodule.split_sizes == {"train": 12, "val": 4, "test": 6}


def test_random_flip_and_translate_moves_each_image_as_one_piece():
    """Each image comes out as its own reflect-padded copy, flipped or not, cropped at one offset of up to 4 pixels."""
    from project.infra.batches import random_flip_and_translate

    images = torch.rand(64, 3, 12, 10)
    moved = random_flip_and_translate(images)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4), mode="reflect")
    for image, out in zip(padded, moved, strict=True):
        crops = [
            view[:, y : y + 12, x : x + 10] for view in (image, image.flip(-1)) for y in range(9) for x in range(9)
        ]
        assert any(torch.equal(out, crop) for crop in crops)
    assert not torch.equal(moved, images)


def epoch_batches(loader, epoch: int) -> list:
    return [(images.clone(), labels.clone()) for images, labels in loader.iterate(epoch)]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_image_folder_epochs_after_the_first_read_the_images_kept_in_memory(tmp_path, num_workers):
    """The same batches as decoding every epoch, with the files gone after the first epoch (and after precise
    BatchNorm's first look, which reads the training split's kept images too); without the memory, a second epoch
    decodes again."""
    import multiprocessing

    before = set(multiprocessing.active_children())
    root = tmp_path / "pets"
    write_image_folder(root, classes=("cat", "dog", "fox"), per_class=10, size=12)
    kwargs = {"image_size": 16, "num_workers": num_workers}
    decoding = DATASETS["image-folder"](data_dir=str(root), batch_size=4, image_memory=1e-9, **kwargs)
    kept = DATASETS["image-folder"](data_dir=str(root), batch_size=4, **kwargs)
    for datamodule in (decoding, kept):
        datamodule.setup("fit")
    assert not decoding.kept and kept.kept.keys() == {"train", "val", "test"}
    train = kept.train_dataloader()
    expected = [epoch_batches(decoding.train_dataloader(), epoch) for epoch in (0, 1)]
    first = epoch_batches(train, 0)
    for path in root.rglob("*.png"):
        path.unlink()
    statistics = next(kept.statistics_batches(4))  # the training split's, from memory
    assert torch.equal(statistics, expected[0][0][0].float())
    for got, want in zip([first, epoch_batches(train, 1)], expected, strict=True):
        assert len(got) == len(want) == 6
        assert all(torch.equal(a, b) and torch.equal(x, y) for (a, x), (b, y) in zip(got, want, strict=True))
    with pytest.raises(UserError, match="cannot read image"):  # never read: the test split is still on disk only
        next(iter(kept.test_dataloader()))
    with pytest.raises(UserError, match="cannot read image"):
        epoch_batches(decoding.train_dataloader(), 2)
    for datamodule in (decoding, kept):
        datamodule.teardown("fit")
    # The workers end here, even those whose error was raised: not in a later garbage collection, 5 s a worker.
    assert set(multiprocessing.active_children()) <= before


def test_while_workers_decode_this_process_leaves_them_their_cores(tmp_path, monkeypatch):
    """Torch's threads here would spin on the cores the workers decode on; reading kept images, they come back."""
    from project.infra import batches

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    write_image_folder(tmp_path / "pets", per_class=6, size=8)
    datamodule = DATASETS["image-folder"](data_dir=str(tmp_path / "pets"), batch_size=4, image_size=8, num_workers=1)
    datamodule.setup("fit")
    try:
        train = datamodule.train_dataloader()
        for epoch, threads in ((0, max(1, batches.DEFAULT_THREADS - 1)), (1, batches.DEFAULT_THREADS)):
            loader = train.iterate(epoch)
            assert torch.get_num_threads() == threads
            list(loader)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice stands
        torch.set_num_threads(2)
        list(datamodule.val_dataloader())
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(batches.DEFAULT_THREADS)
        datamodule.teardown("fit")


@pytest.mark.slow
def test_a_run_in_process_leaves_no_dataloader_worker_behind(tmp_path):
    """A sweep's trials and a notebook's runs share one process: each run's persistent workers end with it. Before,
    they lived on until a garbage collection, which then took 5 s a worker and left them running."""
    import multiprocessing

    import lightning.pytorch as pl

    from project import run

    class Fails(pl.Callback):  # as a sweep's pruner does after a hopeless epoch
        def on_train_epoch_end(self, *_: object) -> None:
            raise RuntimeError("pruned")

    write_image_folder(tmp_path / "pets", per_class=8, size=8)
    argv = ["--dataset", "image-folder", "--data-dir", str(tmp_path / "pets"), "--image-size", "8", "--model", "mlp",
            "--hidden-dim", "8", "--max-epochs", "1", "--num-workers", "2", "--logger", "csv", "--exp-dir",
            str(tmp_path / "experiments")]  # fmt: skip
    for _ in range(2):
        assert run.main(argv) == 0
        assert multiprocessing.active_children() == []
    with pytest.raises(RuntimeError, match="pruned"):
        run.train_and_test(run.parse_args(argv), callbacks=[Fails()])
    assert multiprocessing.active_children() == []


def test_the_image_memory_budget_is_the_machines_for_all_its_processes(tmp_path):
    from types import SimpleNamespace

    root = tmp_path / "pets"
    write_image_folder(root, per_class=10, size=12)
    one_copy = 20 * 3 * 16 * 16 / 2**30  # GiB: 20 images, kept at 3 x 16 x 16 bytes each
    for devices, kept in ((1, True), (2, False)):
        datamodule = DATASETS["image-folder"](data_dir=str(root), image_size=16, image_memory=1.5 * one_copy)
        datamodule.trainer = SimpleNamespace(num_devices=devices)  # DDP: a process per device, each with its copy
        datamodule.setup("fit")
        assert bool(datamodule.kept) is kept, devices


def test_image_folder_remembers_which_headers_it_checked(tmp_path, monkeypatch):
    from project.infra import images

    root = tmp_path / "pets"
    write_image_folder(root)
    setup_module_data("image-folder", root)
    read = []
    original = images.header_problem
    monkeypatch.setattr(images, "header_problem", lambda path: read.append(path) or original(path))
    setup_module_data("image-folder", root)
    assert read == []  # nothing changed: no header read again
    (root / "dog" / "3.png").write_bytes(b"not a png at all")  # another size: read again, and named
    with pytest.raises(UserError, match=f"cannot read image {root / 'dog' / '3.png'}"):
        setup_module_data("image-folder", root)
    assert read == [str(root / "dog" / "3.png")]


@pytest.mark.parametrize("problem", ["missing", "one-class", "unreadable"])
def test_image_folder_problems_are_one_clear_line(tmp_path, problem):
    root = tmp_path / "pets"
    if problem == "one-class":
        write_image_folder(root, classes=("cat",))
    elif problem == "unreadable":
        write_image_folder(root)
        (root / "dog" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(UserError) as error:
        setup_module_data("image-folder", root)
    assert "\n" not in str(error.value)
    if problem == "unreadable":
        assert "broken.png" in str(error.value)


@pytest.mark.parametrize("num_samples, world_size", [(19, 2), (20, 3), (7, 4)])
def test_evaluation_shards_count_every_sample_once(num_samples, world_size):
    seen = []
    for rank in range(world_size):
        plan = EpochBatches(num_samples, 3, shuffle=False, seed=0, rank=rank, world_size=world_size)
        batches = list(plan.batches(epoch=0))
        assert len(batches) == len(plan)
        seen += torch.cat(batches).tolist() if batches else []
    assert sorted(seen) == list(range(num_samples))


def test_training_shards_are_equal_length_disjoint_and_reshuffled_each_epoch():
    plans = [EpochBatches(19, 4, shuffle=True, seed=1, rank=r, world_size=2) for r in range(2)]
    shards = [plan.shard(epoch=0) for plan in plans]
    assert len(shards[0]) == len(shards[1]) == 10  # padded like DistributedSampler
    assert set(torch.cat(shards).tolist()) == set(range(19))
    assert not torch.equal(plans[0].shard(epoch=0), plans[0].shard(epoch=1))
    assert torch.equal(plans[0].shard(epoch=2), EpochBatches(19, 4, True, 1, 0, 2).shard(epoch=2))


@pytest.mark.parametrize(
    "task, targets, inputs, named",
    [("classification", np.arange(12) % 3, (1, 8, 8), "targets run from 0 to 2, but its output_names are"),
     ("classification", np.arange(12) % 2 - 1, (1, 8, 8), "targets run from -1 to 0"),
     ("classification", (np.arange(12) % 2).astype(np.float32), (1, 8, 8), 'says task = "regression"'),
     ("classification", np.arange(12) % 2, (1, 6, 8), "inputs are (1, 6, 8) per sample, but its input_shape says"),
     ("regression", np.zeros((12, 3), np.float32), (1, 8, 8), "are (3,) per sample: one value for each of its 2"),
     ("regression", np.zeros((12, 2), np.float32), (1, 8, 8), "target_mean and target_std hold 1 and 1 values")],
)  # fmt: skip
def test_a_datasets_arrays_that_do_not_fit_what_it_declares_are_one_line(task, targets, inputs, named):
    """A dataset of one's own (the README's NpzImages and the like): labels beyond its classes, values for a
    classification, another shape, one target_mean for several outputs. Before, each was a traceback from the first
    step (or, for target_mean, silently broadcast)."""
    from project.data import as_split
    from project.infra.batches import InMemoryData

    class Mine(InMemoryData):
        input_shape, output_names, mean, std = (1, 8, 8), ["a", "b"], (0.0,), (1.0,)

        def load(self):
            pixels = np.zeros((12, *inputs), np.uint8)
            return {"train": as_split(pixels, targets, np.arange(10)), "test": as_split(pixels, targets, np.arange(10))}

    Mine.task = task
    Mine.target_mean = Mine.target_std = [1.0] if "target_mean" in named else [1.0, 1.0]  # one: copied from Diabetes
    with pytest.raises(UserError) as error:
        Mine().setup("fit")
    assert str(error.value).startswith("Mine: ") and named in str(error.value), error.value
