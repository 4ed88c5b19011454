"""The floor under the template's epoch: gpu_benchmark.py's hand loop against the same data, model and optimiser in a
bare Lightning Trainer (no logger, checkpoint, progress bar or callback of ours; a plain loader yielding float batches),
on the CPU. Seconds per epoch, the first not counted.

    OMP_NUM_THREADS=1 python benchmarks/bare_lightning.py --settings mlp --clock cpu
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project package, from anywhere
import gpu_benchmark as bench  # noqa: E402

from project.infra import console  # noqa: E402
from project.model import build_model  # noqa: E402


class Loader:
    def __init__(self, split: tuple[torch.Tensor, torch.Tensor], batch: int, shuffle: bool) -> None:
        (self.x, self.y), self.batch, self.shuffle = split, batch, shuffle

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch)

    def __iter__(self):
        order = torch.randperm(len(self.y)) if self.shuffle else torch.arange(len(self.y))
        for i in range(0, len(order), self.batch):
            yield self.x[order[i : i + self.batch]].float(), self.y[order[i : i + self.batch]]


class Bare(pl.LightningModule):
    def __init__(self, setting: bench.Setting) -> None:
        super().__init__()
        channels = setting.input_shape[0]
        self.model = build_model(setting.model, setting.input_shape, bench.NUM_CLASSES, (127.5,) * channels,
                                 (73.6,) * channels, hidden_dim=setting.hidden_dim)  # fmt: skip

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.model(batch[0]), batch[1])

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        (self.model(batch[0]).argmax(1) == batch[1]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main() -> int:
    options = bench.parse_args(["--device", "cpu", *sys.argv[1:]])
    if options.clock == "cpu":
        bench.CLOCK[0] = bench.time.process_time
    console.quiet()
    for key in options.settings:
        setting = bench.SETTINGS[key]
        if options.small:
            setting = bench.replace(setting, **bench.SMALL[key])
        data = bench.synthetic_data(setting, options.seed)
        hand = bench.hand_loop(setting, data, torch.device("cpu"), options.epochs, options.seed, False)[1:]
        clock = bench.EpochClock(torch.device("cpu"))
        off = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer = pl.Trainer(accelerator="cpu", max_epochs=options.epochs, callbacks=[clock], **off)
        trainer.fit(Bare(setting), Loader(data["train"], setting.batch_size, True),
                    Loader(data["val"], setting.batch_size, False))  # fmt: skip
        bare = statistics.median(epoch["seconds"] for epoch in clock.epochs()[1:])
        hand_median = statistics.median(hand)
        print(f"{setting.title}: hand loop {hand_median:.3f} s/epoch, bare Lightning Trainer {bare:.3f} s/epoch "
              f"({options.clock} clock): {bare / hand_median:.2f}x the hand loop's time")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
