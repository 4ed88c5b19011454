"""An image folder's epochs: the template (`--dataset image-folder`) beside a plain loop (torchvision's ImageFolder and
a DataLoader with 2 workers, the same decode and resize, the same split, model and batch size, its own validation and
test passes), on folders of 256 x 256 JPEGs in 10 classes that it writes once under --dir.

    python benchmarks/image_folder.py                                  # 1k, 4k and 16k images, 2 rounds
    python benchmarks/image_folder.py --counts 1000 4000 --rounds 3
    python benchmarks/image_folder.py --counts 16000 --plain-augments     # the plain loop flips and shifts too

Each round runs the plain loop, then the template (A B A B), each for 2 epochs in its own process. "first" is the
command as a 1-epoch run would take it: start-up, the first epoch with its validation, then the test pass and what
follows it; "later" is the second epoch with its validation. Prints the medians over the rounds.
"""

from __future__ import annotations

import argparse
import functools
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project package, from anywhere
EPOCH_END = "epoch-end"


def write_folder(root: Path, count: int, size: int) -> Path:
    """`count` JPEGs in 10 classes (image_check's smooth pictures), written once: reruns reuse them."""
    from image_check import write_jpegs

    folder = root / f"{count}-{size}px"
    if not (folder / ".complete").exists():
        write_jpegs(folder, count, size)
        (folder / ".complete").touch()  # hidden: the folder reads the same with it
    return folder


def plain_loop(
    data_dir: str, image_size: int, hidden_dim: int, epochs: int, augment: int, batch_size: int = 128
) -> None:
    """What a user would write by hand, printing the time at the end of each epoch's validation; with `augment`, the
    template's random flips and shifts too (the same work per step, beside the template's own)."""
    import torch
    import torchvision
    from torch.utils.data import DataLoader, Subset

    from project.data import stratified_split
    from project.infra.batches import random_flip_and_translate
    from project.infra.images import read_image
    from project.model import build_model

    shape = (3, image_size, image_size)
    folder = torchvision.datasets.ImageFolder(data_dir, loader=functools.partial(read_image, input_shape=shape))
    labels = torch.tensor(folder.targets).numpy()
    train, test = stratified_split(labels, 0.1, seed=0)  # the template's 80/10/10
    keep, val = stratified_split(labels[train], 1 / 9, seed=0)
    train, val = train[keep], train[val]

    def loader(index, shuffle: bool) -> DataLoader:
        return DataLoader(Subset(folder, index), batch_size, shuffle=shuffle, num_workers=2, persistent_workers=True)

    mean, std = (123.68, 116.28, 103.53), (58.40, 57.12, 57.38)
    model = build_model("mlp", shape, len(folder.classes), mean, std, hidden_dim=hidden_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def accuracy(batches: DataLoader) -> float:
        model.eval()
        with torch.no_grad():
            right = sum(int((model(x.float()).argmax(1) == y).sum()) for x, y in batches)
        return right / len(batches.dataset)

    loaders = {"train": loader(train, True), "val": loader(val, False), "test": loader(test, False)}
    for _ in range(epochs):
        model.train()
        for x, y in loaders["train"]:
            optimizer.zero_grad()
            x = random_flip_and_translate(x).float() if augment else x.float()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        print(f"{EPOCH_END} {time.time()} val/acc {accuracy(loaders['val']):.3f}", flush=True)
    print(f"test/acc {accuracy(loaders['test']):.3f}", flush=True)


def template(argv: list[str]) -> None:
    """`python -m project.run ARGV`, printing the time at the end of each epoch's validation."""
    import lightning.pytorch as pl

    from project import run

    class Clock(pl.Callback):
        def on_validation_end(self, trainer: pl.Trainer, *_: object) -> None:
            if not trainer.sanity_checking:
                print(f"{EPOCH_END} {time.time()}", flush=True)

    args = run.parse_args(argv)
    raise SystemExit(run.run_command(lambda: run.train_and_test(args, [Clock()]), args.debug))


def timed(command: list[str]) -> tuple[float, float]:
    """(first, later) seconds of a 2-epoch command, as the docstring defines them."""
    start = time.time()
    done = subprocess.run([sys.executable, __file__, *command], capture_output=True, text=True, cwd=ROOT)
    end = time.time()
    if done.returncode:
        raise SystemExit(f"{command[0]} failed:\n{done.stderr[-3000:]}")
    ends = [float(time) for time in re.findall(rf"{EPOCH_END} ([\d.]+)", done.stdout)]  # after a progress bar, too
    return ends[0] - start + end - ends[1], ends[1] - ends[0]


def main() -> None:
    if sys.argv[1:2] == ["plain"]:
        return plain_loop(sys.argv[2], *map(int, sys.argv[3:7]))
    if sys.argv[1:2] == ["template"]:
        return template(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "image-folder-benchmark")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--hidden-dim", type=int, default=32, help="the MLP's width, in both (its compute is small)")
    parser.add_argument("--plain-augments", action="store_true", help="the plain loop flips and shifts as the template")
    args = parser.parse_args()
    print("| images | plain first | template first | ratio | plain later | template later | plain / template |")
    print("|---|---|---|---|---|---|---|")
    for count in args.counts:
        folder = str(write_folder(args.dir, count, 256))
        with tempfile.TemporaryDirectory() as runs:
            template_run = ["template", "--dataset", "image-folder", "--data-dir", folder, "--model", "mlp"]
            template_run += ["--image-size", str(args.image_size), "--hidden-dim", str(args.hidden_dim)]
            template_run += ["--logger", "csv", "--num-workers", "2", "--max-epochs", "2", "--exp-dir", runs]
            plain_run = [
                "plain",
                folder,
                str(args.image_size),
                str(args.hidden_dim),
                "2",
                str(int(args.plain_augments)),
            ]
            times = {"plain": [], "template": []}
            for _ in range(args.rounds):  # interleaved: a machine that gets busier slows both alike
                times["plain"].append(timed(plain_run))
                times["template"].append(timed(template_run))
        (p1, p2), (t1, t2) = ([statistics.median(t[i] for t in times[k]) for i in (0, 1)] for k in times)
        print(f"| {count:,} | {p1:.1f} s | {t1:.1f} s | {t1 / p1:.2f}× | {p2:.1f} s | {t2:.2f} s | {p2 / t2:.1f}× |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
