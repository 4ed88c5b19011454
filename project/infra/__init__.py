"""Infrastructure: what keeps runs safe and recorded. You should not need to edit it to change the data, the
model, the training step or the task (those are project/data.py, model.py, solver.py, tasks/): it reads what the
dataset's task says (its metrics and their direction, its report and figures) and names no task's metrics.

    errors.py         how a command ends: one-line mistakes, stops, SIGTERM/SIGINT for every entry point
    cli.py            the command line's value types, short errors, and --config files read by the same parser
    runs.py           where runs live on disk, and finding one (latest, best, last) without importing torch
    records.py        one run's directory, lock, config.yaml, manifest.json, reports and summary
    files.py          files that appear whole or not at all
    tracking.py       the experiment trackers (--logger): MLflow (Lightning's MLFlowLogger), TensorBoard, W&B, and
                      metrics.csv
    redact.py         secrets kept out of every record and printed line
    plots.py          curves.png (loss, the task's first metric, learning rate)
    checkpoints.py    reading checkpoints (weights only) and checking they fit the data and the run
    callbacks.py      atomic checkpoints, exact resume, precise BatchNorm statistics, a diverging loss, signals
    hardware.py       the accelerator, devices and precision, checked against this machine
    batches.py        the DataModule base: batches gathered on the device, or a DataLoader; resumable mid-epoch
    images.py         folders of images read safely, and CIFAR-10 only with its official checksums
    console.py        what the terminal shows: the progress bar, library noise silenced
"""
