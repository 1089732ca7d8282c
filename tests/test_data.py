import gzip
import struct

import numpy as np
import pytest
import torch

from torchslim.core.data import FASHION_MNIST_ENV, DataSpec, fashion_mnist, fashion_mnist_dir, load_data
from torchslim.errors import ConfigError, DataError, DatasetNotFoundError


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion(folder, n_train=50, n_eval=20):
    rng = np.random.default_rng(0)
    _write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    _write_idx(folder / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, (n_train,)))
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_eval, 28, 28)))
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, (n_eval,)))


def test_digits_splits_are_seeded_and_disjoint(digits):
    again = load_data(DataSpec("digits", batch_size=64, eval_batch_size=128, calib_size=256))
    assert torch.equal(digits.eval.tensors[0], again.eval.tensors[0])
    assert digits.train.rows + digits.eval.rows == 1797
    assert digits.train.tensors[0].shape[1:] == (1, 8, 8)
    assert digits.calib.rows == 256
    other = load_data(DataSpec("digits", seed=1))
    assert not torch.equal(other.eval.tensors[1], digits.eval.tensors[1])


def test_train_order_depends_only_on_seeds(digits):
    def first_labels(seed):
        (x, y), rows = next(digits.train_batches(epoch_seed=seed))
        assert torch.equal(x, digits.train.tensors[0][rows])
        return y

    a, b, c = first_labels(3), first_labels(3), first_labels(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sum(len(y) for _, y in digits.train) == digits.train.rows
    assert digits.train_steps() == -(-digits.train.rows // 64)


def test_fashion_mnist_reads_idx_files_from_the_env_folder(tmp_path, monkeypatch):
    _fake_fashion(tmp_path)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    data = fashion_mnist(calib_size=10)
    assert data.train.tensors[0].shape == (50, 1, 28, 28) and data.eval.tensors[1].shape == (20,)
    assert data.train.tensors[1].dtype == torch.int64 and data.calib.rows == 10


def test_missing_fashion_mnist_says_which_package_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "nowhere"))
    assert fashion_mnist_dir() == tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist()


def test_truncated_idx_is_a_data_error(tmp_path, monkeypatch):
    _fake_fashion(tmp_path)
    raw = gzip.open(tmp_path / "train-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(raw[:-100])
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(DataError, match="truncated"):
        fashion_mnist()


def test_bad_spec_values():
    with pytest.raises(ConfigError, match="unknown dataset"):
        DataSpec("cifar")
    with pytest.raises(ConfigError, match="batch_size"):
        DataSpec("digits", batch_size=0)


@pytest.mark.skipif(not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(), reason="needs Debian's dataset")
def test_real_fashion_mnist_shapes_and_normalisation():
    data = fashion_mnist()
    x = data.train.tensors[0]
    assert x.shape == (60_000, 1, 28, 28) and data.eval.rows == 10_000
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1.0) < 0.01
