"""The pipeline on a user's own module: Conv2d, BatchNorm, pooling, flatten and Linear."""

import torch
from torch import nn

import torchslim as ts


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 16, 4, 4)
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),  # (B, 32, 2, 2)
        nn.Flatten(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def test_user_cnn_prunes_shares_saves_and_loads_exactly(tmp_path, digits):
    torch.manual_seed(0)
    model = small_cnn()
    ts.fit(model, digits, ts.TrainConfig(epochs=5, lr=3e-3))
    dense_acc = ts.accuracy(model, digits.eval_loader())
    ts.prune_(
        model,
        ts.MagnitudePruneConfig(sparsity={"re:[0-9]+": 0.7}, steps=2, finetune=ts.TrainConfig(epochs=2, lr=2e-3)),
        data=digits,
    )
    ts.share_(model, ts.ShareConfig(bits=5, finetune=ts.TrainConfig(epochs=1, lr=3e-4)), data=digits)
    assert dense_acc > 0.85 and ts.accuracy(model, digits.eval_loader()) > 0.8

    path = ts.save(model, tmp_path / "cnn.tslim")
    restored = ts.load(path, model=small_cnn)
    x = digits.eval.tensors[0][:64]
    assert torch.equal(restored(x), model.eval()(x))
    assert torch.equal(restored[1].running_var, model[1].running_var)
    conv = restored[0].weight
    assert 0.65 < float((conv == 0).float().mean()) < 0.75 and conv[conv != 0].unique().numel() <= 32
