"""The default digits job written by hand: the loop a user would compare the template with.

Same data split, model, epochs, batch size, optimizer, schedule and checkpoint choice as
`python -m project.run` with its defaults: 80/10/10 stratified split of scikit-learn's digits (seed 0),
the template's CNN (hidden width 128) behind the same standardisation, Adam at 1e-3 with cosine decay
over 20 epochs, batch 128, a validation pass after every epoch, and the test set scored with the weights
of the epoch with the lowest validation loss. It keeps those weights in memory (the template writes
checkpoint files) and logs nothing: that is the cost the template is measured against.

    python benchmarks/hand_digits.py        # prints the test accuracy
"""

import copy
import sys
import time
from pathlib import Path

START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
from project.model import build_model  # noqa: E402  (the same architecture; imports only torch)

SEED, EPOCHS, BATCH, LR, HIDDEN = 0, 20, 128, 1e-3, 128


def split(labels, fraction):
    index = np.arange(len(labels))
    keep, held_out = train_test_split(index, test_size=fraction, stratify=labels, random_state=SEED)
    return np.sort(keep), np.sort(held_out)


def tensors(images, labels, index):
    return torch.as_tensor(images[index]), torch.as_tensor(labels[index], dtype=torch.long)


def evaluate(model, images, labels):
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(images[i : i + BATCH].float()) for i in range(0, len(labels), BATCH)])
    model.train()
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


torch.manual_seed(SEED)
digits = load_digits()
images, labels = digits.images[:, None].astype(np.uint8), digits.target
train, held_out = split(labels, 0.2)
val_pos, test_pos = split(labels[held_out], 0.5)
train_x, train_y = tensors(images, labels, train)
val_x, val_y = tensors(images, labels, held_out[val_pos])
test_x, test_y = tensors(images, labels, held_out[test_pos])

model = build_model("cnn", (1, 8, 8), 10, mean=(4.884,), std=(6.017,), hidden_dim=HIDDEN)
optimizer = torch.optim.Adam(model.parameters(), lr=LR)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
best_loss, best_state = float("inf"), None
for epoch in range(EPOCHS):
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(SEED + epoch))
    for i in range(0, len(order), BATCH):
        index = order[i : i + BATCH]
        loss = F.cross_entropy(model(train_x[index].float()), train_y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    scheduler.step()
    val_loss, _ = evaluate(model, val_x, val_y)
    if val_loss < best_loss:
        best_loss, best_state = val_loss, copy.deepcopy(model.state_dict())

model.load_state_dict(best_state)
_, test_acc = evaluate(model, test_x, test_y)
print(f"Test accuracy: {test_acc:.4f}")
print(f"Wall time in script: {time.perf_counter() - START:.2f} s")
