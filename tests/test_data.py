"""Tests for tinydiff.data.mnist: loading (bundled and IDX), checksums, split, range, batches."""

import gzip
import hashlib

import numpy as np
import pytest

from tinydiff.data import mnist
from tinydiff.data.mnist import (
    DatasetError,
    from_model_range,
    iterate_minibatches,
    load_mnist,
    read_idx,
    to_model_range,
    train_test_split,
)

README_CLASS_COUNTS = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]  # datasets/README.md


def write_idx(path, array, type_code=0x08):
    """Write ``array`` as an IDX file (gzipped if ``path`` ends in .gz), by the format's spec."""
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    data = header + np.asarray(array, dtype=dtype).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


def random_digits(n, seed):
    generator = np.random.default_rng(seed)
    images = generator.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = generator.integers(0, 10, size=n).astype(np.uint8)
    return images, labels


# --------------------------------------------------------------------------- bundled file


def test_bundled_digits_match_the_readme():
    images, labels = load_mnist()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == README_CLASS_COUNTS
    assert images.min() == 0 and images.max() == 255


def test_bundled_file_hash_matches_the_constant():
    data = mnist.bundled_file().read_bytes()
    assert hashlib.sha256(data).hexdigest() == mnist.BUNDLED_SHA256


def test_bundled_hash_mismatch_names_the_file(monkeypatch):
    monkeypatch.setattr(mnist, "BUNDLED_SHA256", "0" * 64)
    with pytest.raises(DatasetError, match="mnist-10k.npz.*sha256"):
        load_mnist()


def test_damaged_copy_is_refused(tmp_path):
    damaged = bytearray(mnist.bundled_file().read_bytes())
    damaged[1000] ^= 0xFF  # one flipped byte
    path = tmp_path / "copy.npz"
    path.write_bytes(bytes(damaged))
    with pytest.raises(DatasetError, match="copy.npz"):
        load_mnist(path, sha256=mnist.BUNDLED_SHA256)


# --------------------------------------------------------------------------- other files


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here.npz"):
        load_mnist(tmp_path / "nothing-here.npz")


def test_npz_with_wrong_shapes_or_arrays_is_refused(tmp_path):
    np.savez(tmp_path / "big.npz", images=np.zeros((3, 32, 32), np.uint8), labels=np.zeros(3, np.uint8))
    with pytest.raises(DatasetError, match=r"\(N, 28, 28\)"):
        load_mnist(tmp_path / "big.npz")
    np.savez(tmp_path / "short.npz", images=np.zeros((3, 28, 28), np.uint8), labels=np.zeros(2, np.uint8))
    with pytest.raises(DatasetError, match="labels must be integers of shape"):
        load_mnist(tmp_path / "short.npz")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(DatasetError, match="not a NumPy .npz archive"):
        load_mnist(tmp_path / "text.npz")
    np.savez(tmp_path / "noimages.npz", labels=np.zeros(3, np.uint8))
    with pytest.raises(DatasetError, match="images"):
        load_mnist(tmp_path / "noimages.npz")


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    images, labels = random_digits(7, seed=1)
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels)
    assert np.array_equal(read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}"), images)
    loaded_images, loaded_labels = load_mnist(tmp_path)
    assert np.array_equal(loaded_images, images) and np.array_equal(loaded_labels, labels)


def test_idx_directory_appends_t10k_after_train(tmp_path):
    train_images, train_labels = random_digits(5, seed=2)
    test_images, test_labels = random_digits(3, seed=3)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test_images)  # mixed gzip / plain is fine
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_labels)
    images, labels = load_mnist(tmp_path)
    assert np.array_equal(images, np.concatenate([train_images, test_images]))
    assert np.array_equal(labels, np.concatenate([train_labels, test_labels]))


def test_idx_reads_multibyte_big_endian_types(tmp_path):
    values = np.arange(-6, 6, dtype=np.int16).reshape(3, 4)
    write_idx(tmp_path / "short.idx", values, type_code=0x0B)
    assert np.array_equal(read_idx(tmp_path / "short.idx"), values)
    floats = np.linspace(-1, 1, 5, dtype=np.float32)
    write_idx(tmp_path / "float.idx", floats, type_code=0x0D)
    assert np.array_equal(read_idx(tmp_path / "float.idx"), floats)


def test_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DatasetError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "whole", np.zeros((4, 28, 28), np.uint8))
    (tmp_path / "cut").write_bytes((tmp_path / "whole").read_bytes()[:-10])
    with pytest.raises(DatasetError, match="header promises shape"):
        read_idx(tmp_path / "cut")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)  # a directory without the expected files


# --------------------------------------------------------------------------- split


def test_split_is_fixed_disjoint_and_complete():
    train, test = train_test_split(10000)
    train_again, test_again = train_test_split(10000, seed=0)
    assert np.array_equal(train, train_again) and np.array_equal(test, test_again)
    assert len(test) == 1000 and len(train) == 9000
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.union1d(train, test), np.arange(10000))
    assert not np.array_equal(test, train_test_split(10000, seed=1)[1])


def test_split_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="n_test"):
        train_test_split(500, n_test=500)


# --------------------------------------------------------------------------- model range


def test_model_range_round_trip_and_padding():
    images, _ = random_digits(4, seed=4)
    x = to_model_range(images)
    assert x.shape == (4, 1, 32, 32) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1
    border = np.ones((32, 32), bool)
    border[2:-2, 2:-2] = False
    assert np.all(x[:, 0, border] == -1)  # padding is background
    assert np.array_equal(from_model_range(x), images)  # exact inverse
    assert from_model_range(x, crop=False).shape == (4, 32, 32)


def test_model_range_end_points_and_clipping():
    images = np.zeros((1, 28, 28), np.uint8)
    images[0, 0, 0] = 255
    x = to_model_range(images)
    assert x[0, 0, 2, 2] == 1.0 and x[0, 0, 2, 3] == -1.0
    overshoot = np.full((2, 32, 32), 1.7, np.float32)  # samplers overshoot a little
    assert np.all(from_model_range(overshoot) == 255)
    with pytest.raises(ValueError, match="28, 28"):
        to_model_range(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="one channel"):
        from_model_range(np.zeros((2, 3, 32, 32)))


# --------------------------------------------------------------------------- batches


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_minibatches_are_deterministic_and_reshuffled_each_epoch():
    indices = np.arange(100, 150)  # 50 indices, batch 16: 3 batches per epoch, 2 left over
    first = take(iterate_minibatches(indices, 16, np.random.default_rng(7)), 9)
    second = take(iterate_minibatches(indices, 16, np.random.default_rng(7)), 9)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert all(b.shape == (16,) for b in first)
    for epoch in range(3):
        seen = np.concatenate(first[3 * epoch : 3 * epoch + 3])
        assert len(np.unique(seen)) == 48 and np.isin(seen, indices).all()  # no repeats within an epoch
    assert not np.array_equal(first[0], first[3])  # a new order next epoch


def test_minibatches_resume_at_a_step():
    indices = np.arange(50)
    run = take(iterate_minibatches(indices, 16, np.random.default_rng(3)), 10)
    resumed = take(iterate_minibatches(indices, 16, np.random.default_rng(3), start_step=4), 6)
    assert all(np.array_equal(a, b) for a, b in zip(run[4:], resumed))


def test_minibatch_size_is_checked():
    with pytest.raises(ValueError, match="batch_size"):
        iterate_minibatches(np.arange(10), 11, np.random.default_rng(0))


def test_step_batches_started_mid_run_continue_the_same_order():
    from tinydiff.data.mnist import step_batches

    straight = step_batches(50, 8, seed=3)
    first = [straight(step) for step in range(20)]
    resumed = step_batches(50, 8, seed=3)
    for step in range(13, 20):  # a run resumed at step 13 (mid-epoch: 6 batches per epoch)
        assert np.array_equal(resumed(step), first[step])
