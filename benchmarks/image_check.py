"""How long `--dataset image-folder` spends before training (project/infra/images.py: listing the folder and reading
every file's header, no pixel decoded; and again for a folder already seen, whose headers a record says read well),
beside a full decode of every image (what it did before), on JPEGs it writes to a temporary folder.

    python benchmarks/image_check.py                       # 2,000 JPEGs of 64 x 64 pixels in 10 classes
    python benchmarks/image_check.py --count 2000 --size 256 --repeats 3

Each figure is the best of --repeats runs, after one untimed pass that brings the files into the page cache
(a first run on a cold disk also waits for the disk). Prints one line per measurement.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project package, from anywhere
from project.infra import images  # noqa: E402


def write_jpegs(root: Path, count: int, size: int, classes: int = 10) -> None:
    """Smooth random pictures (noise compresses badly and decodes slowly, unlike photos), quality 90."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(folder / f"{i}.jpg", quality=90)


def best_of(repeats: int, action) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64, help="pixels per side of each JPEG")
    parser.add_argument("--image-size", type=int, default=64, help="the side images are resized to, as in training")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shape = (3, args.image_size, args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jpegs(root, args.count, args.size)
        os.environ["XDG_CACHE_HOME"] = str(root / ".cache")  # where the record of checked headers goes
        images.open_image_folder(root, shape)  # untimed: the page cache
        opened = best_of(args.repeats, lambda: shutil.rmtree(root / ".cache") or images.open_image_folder(root, shape))
        seen = best_of(args.repeats, lambda: images.open_image_folder(root, shape))
        paths = [path for path, _ in images.open_image_folder(root, shape)["all"].samples]
        decode = best_of(args.repeats, lambda: [images.read_image(path, shape) for path in paths])
    what = f"{args.count} JPEGs of {args.size}x{args.size}, read as {args.image_size}x{args.image_size}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{what}, {cores} cores, best of {args.repeats}:")
    print(f"  before training (list, headers): {opened:.3f} s  ({args.count / opened:,.0f} images/s)")
    print(f"  the same folder seen before:     {seen:.3f} s  ({args.count / seen:,.0f} images/s)")
    print(f"  full decode, one thread:         {decode:.3f} s  ({args.count / decode:,.0f} images/s)")
    if hasattr(os, "getloadavg"):
        print(
            f"  load average while measuring: {os.getloadavg()[0]:.2f} (other work on the machine slows every figure)"
        )


if __name__ == "__main__":
    main()
