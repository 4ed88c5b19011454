"""Reading images safely (project/infra/images.py): CIFAR-10 files are unpickled only when they match their
checksums, and an image folder is read as a person sees it: hidden entries skipped, links never followed
out of it or into a loop, every file counted once, only decoders that run no interpreter, and every problem one
line: before training starts, or (an image that does not decode) when training first reads it."""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import Payload, only_run_dir, register_cifar10_like, run_cli, write_cifar10_like, write_image_folder

from project.data import DATASETS, stratified_split
from project.infra import images
from project.infra.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def plant_payload(data_dir: Path, name: str, marker: Path) -> None:
    """Replace one CIFAR-10 file by a pickle of the same shape whose data runs code when unpickled."""
    payload = {"batch_label": "training batch 1 of 5", "labels": [0], "data": Payload(marker)}
    (data_dir / "cifar-10-batches-py" / name).write_bytes(pickle.dumps(payload))


def one_line_error(action) -> str:
    with pytest.raises(UserError) as error:
        action()
    message = str(error.value)
    assert "\n" not in message, message
    return message


# CIFAR-10 ----------------------------------------------------------------------------------------------


def test_cifar10_files_that_are_not_the_official_ones_are_refused(tmp_path):
    write_cifar10_like(tmp_path)  # their checksums are not registered: torchvision's official ones apply
    datamodule = DATASETS["cifar10"](data_dir=str(tmp_path))
    message = one_line_error(datamodule.prepare_data)
    assert "do not match the official CIFAR-10 checksums" in message
    assert str(tmp_path / "cifar-10-batches-py") in message and "data_batch_1" in message


@pytest.mark.parametrize("name", ["data_batch_1", "test_batch", "batches.meta"])
def test_cifar10_pickle_payload_is_refused_and_never_runs(tmp_path, monkeypatch, name):
    register_cifar10_like(monkeypatch, write_cifar10_like(tmp_path))
    marker = tmp_path / "pwned"
    plant_payload(tmp_path, name, marker)
    with pytest.raises(UserError) as error:
        DATASETS["cifar10"](data_dir=str(tmp_path)).setup()
    assert not marker.exists(), "the planted pickle ran"
    assert f"checksums ({name})" in str(error.value) and "can run code" in str(error.value)
    assert "\n" not in str(error.value)
    # torchvision's own check, before it unpickles, holds without ours in front of it.
    for train in (True, False):
        with pytest.raises(RuntimeError, match="corrupted"):
            DATASETS["cifar10"](data_dir=str(tmp_path)).reader(train)
    assert not marker.exists(), "the planted pickle ran"


def test_cifar10_truncated_file_is_refused_in_one_line(tmp_path, monkeypatch):
    register_cifar10_like(monkeypatch, write_cifar10_like(tmp_path))
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[: batch.stat().st_size // 2])
    message = one_line_error(DATASETS["cifar10"](data_dir=str(tmp_path)).setup)
    assert "checksums (test_batch)" in message and "download again" in message


def test_cifar10_registered_tiny_files_read_with_torchvisions_checks_on(tmp_path, monkeypatch):
    written = write_cifar10_like(tmp_path, per_batch=4, n_test=6)
    register_cifar10_like(monkeypatch, written)
    data = DATASETS["cifar10"](data_dir=str(tmp_path))
    data.prepare_data()  # our checksum check, then torchvision's
    pixels, labels = data.arrays(data.readers["test"])
    assert pixels.shape == (6, 3, 32, 32) and pixels.dtype == np.uint8
    rows = written.batches["test_batch"]["data"]
    assert np.array_equal(pixels.reshape(6, -1), rows) and labels.tolist() == written.batches["test_batch"]["labels"]


def test_project_code_never_unpickles_data():
    """The one way a data file runs code: pickle. Only torchvision's checksum-guarded CIFAR10 unpickles;
    torch.load is always weights_only, numpy never allows pickles."""
    for path in sorted((ROOT / "project").rglob("*.py")):
        code = path.read_text()
        assert not re.search(r"pickle\.(load|Unpickler)|Unpickler\(|dill|joblib\.load", code), path
        for call in re.findall(r"torch\.load\([^)]*\)", code):
            assert "weights_only=True" in call, f"{path}: {call}"
        for call in re.findall(r"np\.load\([^)]*\)", code):
            assert "allow_pickle=False" in call, f"{path}: {call}"


@pytest.mark.slow
def test_cifar10_payload_through_the_cli_is_one_line_before_any_run(tmp_path):
    written = write_cifar10_like(tmp_path / "data", per_batch=8, n_test=8)
    quick = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--model", "mlp", "--hidden-dim", "8"]
    quick += ["--max-epochs", "1", "--logger", "none", "--num-workers", "0"]
    good = run_cli(*quick, "--exp-dir", str(tmp_path / "good"), cifar10_md5=written.md5_file)
    assert good.returncode == 0, good.stderr[-2000:]  # the registered checksums let the tiny files through

    marker = tmp_path / "pwned"
    plant_payload(tmp_path / "data", "data_batch_3", marker)
    bad = run_cli(*quick, "--exp-dir", str(tmp_path / "bad"), cifar10_md5=written.md5_file)
    assert not marker.exists(), "the planted pickle ran"
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    errors = [line for line in bad.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "checksums (data_batch_3)" in errors[0], bad.stderr[-2000:]
    assert not (tmp_path / "bad").exists(), "a run directory was made before the files were checked"


# Image folders -----------------------------------------------------------------------------------------


def open_folder(root: Path, **kwargs):
    return DATASETS["image-folder"](data_dir=str(root), batch_size=4, num_workers=0, image_size=8, **kwargs)


def sample_paths(datamodule) -> list[str]:
    return [path for folder in datamodule.folders.values() for path, _ in folder.samples]


def write_jpeg(path: Path, seed: int = 0, size: int = 32) -> Path:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def test_a_plain_folder_lists_exactly_what_torchvisions_image_folder_lists(tmp_path):
    """Where nothing is hidden or linked, the samples and their order are torchvision's, so a --seed
    splits a folder as it always did (nested sub-folders and upper-case suffixes included)."""
    import torchvision

    root = tmp_path / "pets"
    write_image_folder(root, classes=("cat", "dog", "emu"), per_class=4)
    write_image_folder(root / "cat" / "sub", classes=("a", "b"), per_class=2)
    write_jpeg(root / "cat" / "z.jpg")  # after cat/sub/ by path, before it in torchvision's order
    write_jpeg(root / "dog" / "z.JPG")
    (root / "dog" / "notes.txt").write_text("not an image")
    expected = torchvision.datasets.ImageFolder(str(root)).samples
    assert open_folder(root).folders["all"].samples == expected
    assert len(expected) == 18


def test_the_record_of_checked_headers_names_the_images_only_within_their_folder(tmp_path, monkeypatch):
    """The record (a cache beside the user's others) names no folder above the images: a folder's name may hold a
    secret. A second start reads no header that the record vouches for."""
    import json

    root = tmp_path / "password=Hunter2secret" / "pets"
    write_image_folder(root, per_class=2)
    paths = sorted(str(path) for path in root.rglob("*.png"))
    assert images.check_headers(paths, root) == []
    (record,) = (tmp_path / "cache").rglob("*.json")
    assert sorted(json.loads(record.read_text())) == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    read = []
    with monkeypatch.context() as patched:
        patched.setattr(images, "header_problem", lambda path: read.append(path))
        assert images.check_headers(paths, root) == [] and read == []  # vouched for: none read again
    (root / "cat" / "0.png").write_bytes(b"not an image")  # changed: read again, and named
    assert [problem for problem in images.check_headers(paths, root) if "cat/0.png" in problem]
    assert "Hunter2secret" not in record.read_text()


def test_a_link_to_a_parent_folder_is_refused_not_looped(tmp_path):
    write_image_folder(tmp_path / "pets")
    (tmp_path / "pets" / "cat" / "loop").symlink_to("..")  # torchvision's walk reads every image ~41 times
    message = one_line_error(lambda: open_folder(tmp_path / "pets"))
    assert str(tmp_path / "pets" / "cat" / "loop") in message and "link to a folder" in message


@pytest.mark.parametrize("where", ["inside a class", "as a class", "as train/"])
def test_links_to_folders_are_refused(tmp_path, where):
    root = tmp_path / "pets"
    if where == "as train/":
        write_image_folder(tmp_path / "elsewhere" / "train")
        root.mkdir()
        link = root / "train"
        link.symlink_to(tmp_path / "elsewhere" / "train")
    else:
        write_image_folder(root)
        write_image_folder(tmp_path / "more", classes=("emu",))
        link = root / "cat" / "more" if where == "inside a class" else root / "emu"
        link.symlink_to(tmp_path / "more" / "emu")
    message = one_line_error(lambda: open_folder(root))
    assert str(link) in message and "links to folders are not followed" in message


def test_links_to_files_are_read_once_and_only_inside_the_folder(tmp_path):
    root = tmp_path / "pets"
    write_image_folder(root, per_class=10)
    (root / "dog" / "also-cat-0.png").symlink_to(root / "cat" / "0.png")  # already counted: not again
    write_image_folder(root / ".originals", classes=("stash",), per_class=1)
    for name in ("first.png", "second.png"):  # two names, one file: counted once
        (root / "cat" / name).symlink_to(root / ".originals" / "stash" / "0.png")
    datamodule = open_folder(root)
    paths = sample_paths(datamodule)
    assert len(paths) == len(set(map(os.path.realpath, paths))) == 21
    assert str(root / "cat" / "0.png") in paths and str(root / ".originals" / "stash" / "0.png") in paths

    write_image_folder(tmp_path / "outside", classes=("x",), per_class=1)
    (root / "cat" / "outside.png").symlink_to(tmp_path / "outside" / "x" / "0.png")
    message = one_line_error(lambda: open_folder(root))
    assert str(root / "cat" / "outside.png") in message and "outside" in message


def test_a_link_never_puts_a_training_image_in_test(tmp_path):
    root = tmp_path / "pets"
    write_image_folder(root / "train", per_class=6)
    write_image_folder(root / "test", per_class=2)
    (root / "test" / "cat" / "leak.png").symlink_to(root / "train" / "cat" / "0.png")
    os.link(root / "train" / "dog" / "1.png", root / "test" / "dog" / "hard-leak.png")  # one file, two names
    os.link(root / "train" / "dog" / "2.png", root / "train" / "cat" / "twice.png")  # and within a split
    datamodule = open_folder(root, val_fraction=0.25)
    assert len(datamodule.folders["test"]) == 4 and len(datamodule.folders["train"]) == 12
    train = {os.path.realpath(p) for p, _ in datamodule.folders["train"].samples}
    assert not train & {os.path.realpath(p) for p, _ in datamodule.folders["test"].samples}


def test_a_broken_link_is_named(tmp_path):
    write_image_folder(tmp_path / "pets")
    (tmp_path / "pets" / "dog" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    message = one_line_error(lambda: open_folder(tmp_path / "pets"))
    assert str(tmp_path / "pets" / "dog" / "gone.png") in message and "not a regular file, nor a link to one" in message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_named_like_an_image_is_named_not_opened(tmp_path):
    write_image_folder(tmp_path / "pets")
    os.mkfifo(tmp_path / "pets" / "cat" / "camera.jpg")  # opening it would wait for a writer forever
    message = one_line_error(lambda: open_folder(tmp_path / "pets"))
    assert f"{tmp_path / 'pets' / 'cat' / 'camera.jpg'} is not a regular file" in message


def test_hidden_entries_are_skipped_at_any_depth(tmp_path):
    root = tmp_path / "pets"
    write_image_folder(root, per_class=10)
    write_image_folder(root / ".ipynb_checkpoints", classes=("cat",), per_class=2)  # not a class
    write_image_folder(root / "cat" / ".ipynb_checkpoints", classes=("old",), per_class=2)
    (root / "dog" / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS AppleDouble")  # would fail to decode
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    write_image_folder(root / "cat" / "indoor", classes=("sofa",), per_class=1)  # a sub-folder is still cat
    datamodule = open_folder(root)
    assert datamodule.output_names == ["cat", "dog"]
    assert len(sample_paths(datamodule)) == 21
    assert (str(root / "cat" / "indoor" / "sofa" / "0.png"), 0) in datamodule.folders["all"].samples
    assert not any("/." in path for path in sample_paths(datamodule))


def test_a_link_given_as_data_dir_is_read(tmp_path):
    write_image_folder(tmp_path / "pets")
    (tmp_path / "shortcut").symlink_to(tmp_path / "pets")
    assert len(sample_paths(open_folder(tmp_path / "shortcut"))) == 20


@pytest.mark.parametrize(
    "content", [{}, {".0.png": "image", ".thumbs": "folder"}, {"notes.txt": b"cats"}], ids=["empty", "hidden", "text"]
)
def test_a_class_folder_without_images_is_one_line(tmp_path, content):
    root = tmp_path / "pets"
    write_image_folder(root, classes=("cat", "dog"))
    (root / "emu").mkdir()
    for name, what in content.items():
        if what == "image":
            write_jpeg(root / "emu" / name)
        elif what == "folder":
            write_image_folder(root / "emu" / name, classes=("x",), per_class=1)
        else:
            (root / "emu" / name).write_bytes(what)
    message = one_line_error(lambda: open_folder(root))
    assert f"class folder {root / 'emu'} has no images: no file whose name ends in .jpg" in message
    assert "names starting with '.' are skipped" in message


def test_a_truncated_jpeg_is_named_when_first_read_not_decoded_up_front(tmp_path):
    from PIL import Image

    root = tmp_path / "pets"
    write_image_folder(root)
    jpeg = write_jpeg(root / "dog" / "photo.jpg")
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size * 2 // 3])
    with Image.open(jpeg) as image:
        image.verify()  # PIL's own check lets it through; so does reading its header, before training
    folder = open_folder(root).folders["all"]
    index = folder.samples.index((str(jpeg), 1))
    message = one_line_error(lambda: folder[index])
    assert message.startswith(f"image-folder: cannot read image {jpeg} (OSError: image file is truncated")
    assert message.endswith("); remove or replace it")


def test_files_that_are_not_images_are_one_line_naming_the_first_and_counting_the_rest(tmp_path):
    root = tmp_path / "pets"
    write_image_folder(root)
    bad = root / "cat" / "a.png"
    bad.write_bytes(b"not a png at all")
    message = one_line_error(lambda: open_folder(root))
    formats = "BMP, JPEG, PNG, PPM, TIFF, WEBP"
    assert message == f"image-folder: cannot read image {bad} (not a {formats} image); remove or replace it"
    (root / "dog" / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    (root / "dog" / "c.tif").write_bytes(b"")
    message = one_line_error(lambda: open_folder(root))
    assert message.startswith(f"image-folder: cannot read image {bad} (")
    assert message.endswith("(2 more images cannot be read)")


def corrupt_jpeg(path: Path) -> None:
    """A JPEG whose header reads but whose Huffman table is zeroed: PIL fails only when it decodes the pixels."""
    data = write_jpeg(path).read_bytes()
    table = data.index(b"\xff\xc4") + 5  # after the marker, the length and the table's class and id
    path.write_bytes(data[:table] + bytes(16) + data[table + 16 :])


def truncated_png(path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n"
BAD_FILES = {  # name: (how to write it, when it is found, what the line says)
    "corrupt.jpg": (corrupt_jpeg, "first read", "(OSError: broken data stream when reading image file)"),
    "truncated.png": (truncated_png, "first read", "(OSError: image file is truncated"),
    "text.png": (lambda path: path.write_text("a note, not a picture\n"), "before training", "(not a BMP, JPEG"),
    "postscript.png": (lambda path: path.write_bytes(EPS), "before training", "(not a BMP, JPEG"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_bad_image_is_one_line_and_no_interpreter_runs(tmp_path, monkeypatch, name):
    from PIL import EpsImagePlugin, Image

    opened_as_eps = []
    original = EpsImagePlugin.EpsImageFile.__init__

    def recording(self, *args, **kwargs):
        opened_as_eps.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "__init__", recording)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: pytest.fail("Ghostscript ran"))
    write, when, why = BAD_FILES[name]
    root = tmp_path / "pets"
    write_image_folder(root)
    bad = root / "dog" / name
    write(bad)

    def read_every_image():
        for folder in open_folder(root).folders.values():
            for index in range(len(folder)):
                folder[index]

    message = one_line_error(read_every_image)
    assert message.startswith(f"image-folder: cannot read image {bad} {why}"), message
    if when == "before training":
        one_line_error(lambda: open_folder(root))
    else:
        open_folder(root)  # its header reads: it is found when training first decodes it
    assert not opened_as_eps, "Pillow's EPS plugin was used"
    if name == "postscript.png":  # the file is EPS to a Pillow left to guess: `formats` alone kept its plugin out
        with Image.open(bad):
            assert opened_as_eps


@pytest.mark.parametrize("name", ["corrupt.jpg", "truncated.png"])
def test_an_image_that_fails_in_a_dataloader_worker_is_still_one_line(tmp_path, name):
    import multiprocessing

    from torch.utils.data import DataLoader

    from project.infra.batches import Batches

    before = set(multiprocessing.active_children())
    root = tmp_path / "pets"
    write_image_folder(root)
    BAD_FILES[name][0](root / "cat" / name)
    folder = open_folder(root).folders["all"]
    message = one_line_error(lambda: list(Batches.read(DataLoader(folder, batch_size=4, num_workers=1))))
    assert message.startswith(f"image-folder: cannot read image {root / 'cat' / name} {BAD_FILES[name][2]}")
    assert set(multiprocessing.active_children()) <= before  # its worker ended with the error, not at a later GC


def test_a_class_folder_named_in_bytes_that_are_not_utf8_is_one_line(tmp_path):
    root = tmp_path / "pets"
    write_image_folder(root)
    try:
        os.rename(root / "dog", os.fsencode(root) + b"/d\xf6g")  # Latin-1, as an old archive may name it
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only UTF-8 names")
    message = one_line_error(lambda: open_folder(root))
    assert "class folder 'd\\udcf6g'" in message and "not named in printable UTF-8" in message
    message.encode("utf-8")  # printable as it stands


@pytest.mark.parametrize(
    "layout, val_fraction, needed",
    [("one folder", 0.1, 3), ("train/ only", 0.5, 4), ("train/ and val/", 0.75, 4)],
)
def test_a_folder_too_small_to_split_says_how_many_it_needs(tmp_path, layout, val_fraction, needed):
    root = tmp_path / "pets"
    base = root if layout == "one folder" else root / "train"
    write_image_folder(base, per_class=1)
    if layout == "train/ and val/":
        write_image_folder(root / "val", per_class=1)
    message = one_line_error(lambda: open_folder(root, val_fraction=val_fraction))
    assert f"{base} holds 2 image(s), too few to split" in message and f"needs at least {needed};" in message
    for i in range(needed - 2):  # exactly as many as it said: every split gets at least one
        write_jpeg(base / "cat" / f"more{i}.jpg", seed=i)
    datamodule = open_folder(root, val_fraction=val_fraction)
    datamodule.setup()
    assert sum(datamodule.split_sizes.values()) == needed + (layout == "train/ and val/") * 2
    assert min(datamodule.split_sizes.values()) >= 1


@pytest.mark.parametrize("fractions", [[0.1, 1 / 9], [0.1, 0.1], [0.25], [0.5, 0.5], [0.3, 0.2]])
def test_smallest_splittable_is_exactly_where_scikit_learn_starts_to_split(fractions):
    needed = images.smallest_splittable(fractions)
    for count in range(1, 40):
        labels = np.arange(count) % 2
        try:
            for fraction in fractions:
                keep, _ = stratified_split(labels, fraction, seed=0)
                labels = labels[keep]
            splits = len(labels) > 0
        except ValueError:
            splits = False
        assert splits == (count >= needed), (count, needed)


def test_val_and_test_folders_without_train_are_one_line(tmp_path):
    write_image_folder(tmp_path / "pets" / "val")
    write_image_folder(tmp_path / "pets" / "test")
    assert "has val/ or test/ but no train/" in one_line_error(lambda: open_folder(tmp_path / "pets"))


def test_pixels_are_read_as_a_viewer_shows_them(tmp_path):
    """16-bit images scaled to 8 bits (convert() alone clips every pixel above 255 to white), photos turned upright
    by their EXIF orientation, and a file whose name holds a newline named on one line."""
    from PIL import Image

    deep = (np.arange(64).reshape(8, 8) * 1000 + 257).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    read = images.read_image(tmp_path / "deep.png", (1, 8, 8))
    assert np.array_equal(read[0].numpy(), deep // 256)
    sideways = np.zeros((4, 8, 3), dtype=np.uint8)
    sideways[:, :2] = 255  # a white band on the left; orientation 6: turn it 90 degrees clockwise to view it
    photo = Image.fromarray(sideways)
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(tmp_path / "photo.png", exif=exif)
    upright = images.read_image(tmp_path / "photo.png", (1, 8, 4))[0].numpy()
    assert (upright[:2] > 200).all() and (upright[2:] < 50).all()  # the band is on top now
    (tmp_path / "two\nlines.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    message = images.unreadable(str(tmp_path / "two\nlines.png"), OSError("broken"))
    assert "\n" not in message and "two\\nlines.png" in message


def test_presplit_folders_must_share_their_classes(tmp_path):
    write_image_folder(tmp_path / "pets" / "train", classes=("cat", "dog"))
    write_image_folder(tmp_path / "pets" / "val", classes=("cat", "emu"))
    message = one_line_error(lambda: open_folder(tmp_path / "pets"))
    assert "has classes ['cat', 'emu'], expected ['cat', 'dog']" in message


@pytest.mark.slow
def test_image_folder_through_the_cli_skips_hidden_and_stops_at_an_image_that_no_longer_decodes(tmp_path):
    """Nothing is decoded before training, at a start or a --resume: an image damaged after the first epoch is named
    in one line when the resumed run reads it, and the run stops with exit 2, its last checkpoint as it was."""
    root = tmp_path / "pets"
    write_image_folder(root, per_class=10, size=16)
    write_image_folder(root / ".ipynb_checkpoints", classes=("cat",), per_class=1)
    (root / "dog" / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS AppleDouble")
    quick = ["--dataset", "image-folder", "--data-dir", str(root), "--image-size", "16", "--model", "mlp"]
    quick += ["--hidden-dim", "8", "--max-epochs", "1", "--logger", "none", "--num-workers", "1"]
    good = run_cli(*quick, "--exp-dir", str(tmp_path / "runs"))
    assert good.returncode == 0, good.stderr[-2000:]
    last = only_run_dir(tmp_path / "runs") / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()

    for png in (root / "cat").glob("*.png"):  # every split holds some: the first read of any one fails
        png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])  # the header still reads
    bad = run_cli("--resume", str(last), "--max-epochs", "2")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    errors = [line for line in bad.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, bad.stderr[-2000:]
    assert f"cannot read image {root / 'cat'}" in errors[0] and "image file is truncated" in errors[0], errors[0]
    assert last.read_bytes() == saved


@pytest.mark.slow
def test_a_folder_changed_before_a_resume_or_a_test_is_refused_in_one_line(tmp_path):
    """Images added (or removed, or renamed) after a run started would move others between its splits: --resume and
    --only-test refuse, naming the folder, before any run is opened or changed; put back, the folder resumes."""
    root = tmp_path / "pets"
    write_image_folder(root, per_class=10, size=16)
    quick = ["--dataset", "image-folder", "--data-dir", str(root), "--image-size", "16", "--model", "mlp"]
    quick += ["--hidden-dim", "8", "--max-epochs", "1", "--logger", "none", "--num-workers", "0"]
    assert run_cli(*quick, "--exp-dir", str(tmp_path / "runs")).returncode == 0
    last = only_run_dir(tmp_path / "runs") / "checkpoints" / "last.ckpt"
    files = {path: path.read_bytes() for path in (tmp_path / "runs").rglob("*") if path.is_file()}
    added = write_jpeg(root / "cat" / "new.jpg")
    for command in (["--resume", str(last), "--max-epochs", "2"], ["--only-test", "--checkpoint", str(last)]):
        bad = run_cli(*command)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
        errors = [line for line in bad.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and f"{root} has changed since this run started (20 images then, 21 now)" in errors[0]
        assert {path: path.read_bytes() for path in (tmp_path / "runs").rglob("*") if path.is_file()} == files
    added.unlink()
    other = tmp_path / "other"  # --data-dir may move a run's data, not change them
    write_image_folder(other, per_class=11, size=16)
    bad = run_cli("--resume", str(last), "--max-epochs", "2", "--data-dir", str(other))
    assert bad.returncode == 2 and f"{other} has changed since this run started (20 images then, 22 now)" in bad.stderr
    moved = shutil.copytree(root, tmp_path / "moved")
    tested = run_cli("--only-test", "--checkpoint", str(last), "--data-dir", str(moved))
    assert tested.returncode == 0, tested.stderr[-2000:]
    resumed = run_cli("--resume", str(last), "--max-epochs", "2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]


@pytest.mark.parametrize("garbage", ["[]", "null", '"x"', "[" * 100_000, "{not json"])
def test_a_damaged_record_of_checked_headers_is_read_anew(tmp_path, garbage):
    root = tmp_path / "pets"
    write_image_folder(root, per_class=2)
    paths = sorted(str(path) for path in root.rglob("*.png"))
    assert images.check_headers(paths, root) == []
    (record,) = (tmp_path / "cache").rglob("*.json")
    record.write_text(garbage)
    assert images.check_headers(paths, root) == [] and record.read_text().startswith("{")
    record.unlink()
    record.mkdir()  # a folder where the record goes: never written, and no temporary file left beside it
    assert images.check_headers(paths, root) == [] and sorted(p.name for p in record.parent.iterdir()) == [record.name]


def test_16_bit_images_are_scaled_and_32_bit_or_float_ones_named(tmp_path):
    """16-bit PNG and PGM: their full range becomes 0..255; 32-bit integer or floating-point pixels, whose range
    nothing says, are one line (clipped, they were black)."""
    from PIL import Image

    full = np.full((8, 8), 65535, np.uint16)
    for name in ("16.png", "16.pgm", "16.tif"):
        Image.fromarray(full).save(tmp_path / name)
        assert images.read_image(tmp_path / name, (1, 8, 8)).max() == 255, name
    Image.fromarray(np.full((8, 8), 200, np.int32)).save(tmp_path / "32.tif")
    Image.fromarray(np.full((8, 8), 0.8, np.float32)).save(tmp_path / "float.tif")
    for name in ("32.tif", "float.tif"):
        with pytest.raises(ValueError, match="32-bit integer or floating-point pixels"):
            images.read_image(tmp_path / name, (1, 8, 8))


def test_class_names_are_drawn_as_written_and_a_control_character_in_one_is_named(tmp_path):
    from project.tasks import build_task

    task = build_task("classification", ["cost$^$x", "$5_to_$10", "dog"])
    task.draw_confusion(np.eye(3, dtype=int), tmp_path / "confusion.png")  # matplotlib would parse $...$ as maths
    assert (tmp_path / "confusion.png").stat().st_size > 0
    write_image_folder(tmp_path / "pets", classes=("do\ng", "cat"), per_class=2)
    message = one_line_error(lambda: open_folder(tmp_path / "pets"))
    assert "class folder 'do\\ng'" in message and "not named in printable UTF-8" in message


def test_a_rename_between_two_names_that_are_not_utf8_changes_what_the_run_records(tmp_path):
    root = tmp_path / "pets"
    write_image_folder(root, per_class=4)
    try:
        os.rename(root / "cat" / "0.png", os.fsencode(root / "cat") + b"/\xff\xfe.png")
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only UTF-8 names")
    before = open_folder(root).listed
    os.rename(os.fsencode(root / "cat") + b"/\xff\xfe.png", os.fsencode(root / "cat") + b"/\xfd\xfc.png")
    assert open_folder(root).listed != before  # a resume or --only-test says the folder changed


def test_deterministic_runs_keep_torchs_threads_whether_or_not_workers_read(monkeypatch):
    """Some operations' results depend on the number of threads: an epoch read from memory must compute as one
    decoded by workers did, or a resumed run differs from the uninterrupted one."""
    import torch

    from project.infra import batches

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    try:
        torch.use_deterministic_algorithms(True)
        batches.cores_beside(2)
        assert torch.get_num_threads() == batches.DEFAULT_THREADS
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
