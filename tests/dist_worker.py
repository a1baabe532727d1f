"""A torchrun worker for tests/test_distributed.py: python -m torch.distributed.run --nproc-per-node N
tests/dist_worker.py <out.pt>. Trains a small BatchNorm-free network deterministically (no augmentation,
no dropout, no class weights) with lib.engine.fit on this rank's share; rank 0 saves the final
weights and history."""

import sys

import numpy as np
import torch
from torch import nn

from lib import distributed, engine


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(128, 3))

    def forward(self, x):
        return self.classifier(self.features(x))


def main(out: str) -> None:
    dist = distributed.init(seed=0)
    engine.seed_everything(0)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 16)
    gray = rng.random((48, 1, 32, 32), dtype=np.float32) * 0.4
    for c in range(3):
        gray[y == c, :, :, c * 10: c * 10 + 8] += 0.4
    model = Net()  # the same initial weights on every rank (seeded alike; DDP also broadcasts rank 0's)
    train_set, val_set = engine.GrayDataset(gray, y), engine.GrayDataset(gray[::2], y[::2])
    train = torch.utils.data.DataLoader(train_set, batch_size=8 // dist.world, drop_last=True,
                                        sampler=distributed.sampler(train_set, dist))
    val = torch.utils.data.DataLoader(distributed.shard(val_set, dist), batch_size=5)
    res = engine.fit(model, train, val, n_classes=3, epochs=4, lr=3e-3, weight_decay=0.01, warmup_epochs=1,
                     patience=10, device="cpu", criterion=nn.CrossEntropyLoss(label_smoothing=0.1),
                     on_best=lambda *a: None, progress=False, dist=dist)
    if dist.main:
        torch.save({"state": model.state_dict(), "history": res.history, "world": dist.world}, out)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
