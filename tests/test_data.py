"""Tests for dirac_jax.data: loaders, augmentation, batch indices. Nothing is downloaded."""

import gzip
import io
import pathlib
import pickle
import struct
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dirac_jax import data

FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")


def _idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file holding a uint8 array."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


# ---------------------------------------------------------------------------
# IDX


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
@pytest.mark.parametrize(("split", "n"), [("train", 60000), ("test", 10000)])
def test_real_fashion_mnist(split, n):
    ds = data.load("fashion_mnist", source="idx", split=split)
    assert ds.images.shape == (n, 28, 28, 1) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (n,) and ds.labels.dtype == np.int32
    assert ds.num_classes == 10 and ds.name == "fashion_mnist" and len(ds) == n
    np.testing.assert_array_equal(np.bincount(ds.labels, minlength=10), np.full(10, n // 10))
    # Real images, not a blank array: a sizeable share of pixels is lit.
    assert 0.2 < (ds.images > 0).mean() < 0.8
    # "auto" finds the same files through the default directory.
    if split == "test":
        auto = data.load("fashion_mnist", split="test")
        np.testing.assert_array_equal(auto.images, ds.images)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    array = np.random.default_rng(0).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    raw = _idx_bytes(array)
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    back = data.read_idx(path, expected_magic=data.IDX_IMAGES_MAGIC)
    np.testing.assert_array_equal(back, array)
    assert back.dtype == np.uint8 and back.flags.writeable


def test_idx_wrong_magic_and_truncation(tmp_path):
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(_idx_bytes(np.arange(4, dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"labels-idx1-ubyte.*0x00000801.*0x00000803"):
        data.read_idx(path, expected_magic=data.IDX_IMAGES_MAGIC)
    path.write_bytes(b"\x12\x34\x56\x78" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(path)
    path.write_bytes(_idx_bytes(np.arange(4, dtype=np.uint8))[:-1])
    with pytest.raises(ValueError, match="header"):
        data.read_idx(path)


def test_idx_loader_from_dir(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (6,), dtype=np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    ds = data.load("mnist", source="idx", data_dir=tmp_path, split="test")
    np.testing.assert_array_equal(ds.images[..., 0], images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.labels.dtype == np.int32
    # Swapped files are caught by the magic-number check.
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(images))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        data.load("mnist", source="idx", data_dir=tmp_path, split="test")


# ---------------------------------------------------------------------------
# CIFAR python archive


def _cifar_batch(rng, n, label_key, num_classes):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, (n,)).tolist()
    # The real format: rows are the R plane, then G, then B, each row-major.
    rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)
    payload = {b"data": rows, label_key: labels, b"batch_label": b"fake"}
    return pickle.dumps(payload, protocol=2), images, np.asarray(labels)


def _write_tar(path, folder, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


@pytest.fixture
def fake_cifar10(tmp_path):
    rng = np.random.default_rng(2)
    members, train, test = {}, [], None
    for i in range(1, 6):
        blob, images, labels = _cifar_batch(rng, 3, b"labels", 10)
        members[f"data_batch_{i}"] = blob
        train.append((images, labels))
    members["test_batch"], *test = _cifar_batch(rng, 4, b"labels", 10)
    members["batches.meta"] = pickle.dumps({b"label_names": []})
    _write_tar(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
    train_images = np.concatenate([t[0] for t in train])
    train_labels = np.concatenate([t[1] for t in train])
    return tmp_path, members, (train_images, train_labels), tuple(test)


def test_cifar10_archive(fake_cifar10):
    root, members, (train_images, train_labels), (test_images, test_labels) = fake_cifar10
    ds = data.load("cifar10", source="cifar_archive", data_dir=root)
    assert ds.images.shape == (15, 32, 32, 3) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images, train_images)
    np.testing.assert_array_equal(ds.labels, train_labels)
    # Channel order: the first 1024 bytes of a row are the red plane.
    row = np.frombuffer(pickle.loads(members["data_batch_1"], encoding="bytes")[b"data"][0], "u1")
    np.testing.assert_array_equal(ds.images[0, :, :, 0].ravel(), row[:1024])
    test = data.load("cifar10", source="auto", data_dir=root, split="test")
    np.testing.assert_array_equal(test.images, test_images)
    np.testing.assert_array_equal(test.labels, test_labels)

    # The same data, extracted: DIR/cifar-10-batches-py/... and DIR pointing inside.
    extracted = root / "x"
    with tarfile.open(root / "cifar-10-python.tar.gz") as tar:
        tar.extractall(extracted, filter="data")
    for data_dir in (extracted, extracted / "cifar-10-batches-py"):
        again = data.load("cifar10", source="cifar_archive", data_dir=data_dir)
        np.testing.assert_array_equal(again.images, train_images)
        np.testing.assert_array_equal(again.labels, train_labels)


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(3)
    blob, images, labels = _cifar_batch(rng, 5, b"fine_labels", 100)
    payload = pickle.loads(blob, encoding="bytes")
    payload[b"coarse_labels"] = [0] * 5
    blob = pickle.dumps(payload, protocol=2)
    _write_tar(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", {"train": blob})
    ds = data.load("cifar100", source="cifar_archive", data_dir=tmp_path)
    assert ds.num_classes == 100
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)


# ---------------------------------------------------------------------------
# Errors and guidance


def test_missing_cifar_guidance(tmp_path):
    with pytest.raises(data.DataNotFoundError) as info:
        data.load("cifar10", data_dir=tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for needle in (
        "cifar_archive:",
        "tfds:",
        "cifar-10-python.tar.gz",
        "dataset.data_dir=DIR",
        "dataset.source=cifar_archive",
        "tfds build cifar10 --file_format=array_record",
        "source=synthetic",
    ):
        assert needle in message, needle


def test_missing_fashion_mnist_guidance(tmp_path):
    with pytest.raises(data.DataNotFoundError) as info:
        data.load("fashion_mnist", source="idx", data_dir=tmp_path)
    message = str(info.value)
    for needle in (
        str(tmp_path),
        "apt-get install dataset-fashion-mnist",
        "dataset.source=idx",
        "dataset.data_dir=DIR",
        "tfds build fashion_mnist",
    ):
        assert needle in message, needle


def test_tfds_not_prepared_says_how_to_build_it(tmp_path):
    with pytest.raises(data.DataNotFoundError, match="tfds build mnist --file_format=array_record"):
        data.load("mnist", source="tfds", data_dir=tmp_path)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"'svhn'.*cifar10, cifar100, mnist, fashion_mnist"):
        data.load("svhn")
    with pytest.raises(ValueError, match=r"'hdf5'.*auto, idx, cifar_archive, tfds, synthetic"):
        data.load("cifar10", source="hdf5")
    with pytest.raises(ValueError, match="'idx' does not apply to cifar10"):
        data.load("cifar10", source="idx")
    with pytest.raises(ValueError, match="'valid'"):
        data.load("mnist", source="synthetic", split="valid")
    with pytest.raises(ValueError, match="'imagenet'"):
        data.normalize(jnp.zeros((1, 1, 1, 3), jnp.uint8), "imagenet")


def test_synthetic_and_prepare():
    a = data.load("mnist", source="synthetic", synthetic_size=10)
    b = data.load("mnist", source="synthetic", synthetic_size=10)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.images.shape == (10, 28, 28, 1) and a.labels.max() < 10
    test = data.load("cifar100", source="synthetic", split="test")
    assert test.images.shape == (512, 32, 32, 3) and test.num_classes == 100

    padded = data.prepare(a)
    assert padded.images.shape == (10, 32, 32, 1) and padded.images.dtype == np.uint8
    np.testing.assert_array_equal(padded.images[:, 2:30, 2:30], a.images)
    assert padded.images.sum() == a.images.astype(np.int64).sum()  # zero border
    assert data.prepare(test) is test
    with pytest.raises(ValueError):
        data.pad_to(test.images, 28)
    # A pytree of the two arrays: device_put moves them, the metadata stays static.
    on_device = jax.device_put(padded)
    assert isinstance(on_device.images, jax.Array) and on_device.name == "mnist"


# ---------------------------------------------------------------------------
# Augmentation and normalization


def _crop_candidates(image, pad):
    """All (offset, flip) crops of the reflect-padded image."""
    h, w, _ = image.shape
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy : dy + h, dx : dx + w]
            yield (dy, dx, False), crop
            yield (dy, dx, True), crop[:, ::-1]


def _matches(image, out, pad):
    """The (dy, dx, flip) crops equal to `out`; more than one where reflection aliases."""
    matches = {c for c, crop in _crop_candidates(image, pad) if np.array_equal(crop, out)}
    assert matches, "output is not a crop of the reflect-padded input"
    return frozenset(matches)


def test_augment_outputs_are_padded_crops():
    images = np.random.default_rng(4).integers(0, 256, (32, 8, 8, 2), dtype=np.uint8)
    out = np.asarray(data.augment(jax.random.key(0), jnp.asarray(images)))
    assert out.shape == images.shape and out.dtype == np.uint8
    found = [_matches(x, y, 4) for x, y in zip(images, out, strict=True)]
    assert len(set(found)) > 10  # varied crops
    # Some outputs are only reachable by flipping, some only without.
    assert any(all(flip for _, _, flip in m) for m in found)
    assert any(not any(flip for _, _, flip in m) for m in found)

    no_flip = np.asarray(data.augment(jax.random.key(1), jnp.asarray(images), flip=False))
    for x, y in zip(images, no_flip, strict=True):
        assert any(not flip for _, _, flip in _matches(x, y, 4))
    np.testing.assert_array_equal(
        np.asarray(data.augment(jax.random.key(1), jnp.asarray(images), pad=0, flip=False)),
        images,
    )


def test_augment_keys_and_jit():
    images = jnp.asarray(np.random.default_rng(5).integers(0, 256, (16, 32, 32, 3), np.uint8))
    eager = data.augment(jax.random.key(0), images)
    jitted = jax.jit(data.augment, static_argnames=("pad", "flip"))(jax.random.key(0), images)
    np.testing.assert_array_equal(eager, jitted)
    other = data.augment(jax.random.key(1), images)
    assert not np.array_equal(eager, other)
    with pytest.raises(ValueError, match="pad"):
        data.augment(jax.random.key(0), images[:, :4, :4], pad=4)


def test_normalize():
    image = jnp.full((2, 4, 4, 3), 128, jnp.uint8)
    out = jax.jit(data.normalize, static_argnums=1)(image, "cifar10")
    assert out.dtype == jnp.float32 and out.shape == image.shape
    mean = np.array([125.3, 123.0, 113.9]) / 255
    std = np.array([63.0, 62.1, 66.7]) / 255
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), (128 / 255 - mean) / std, rtol=1e-5)
    # Normalizing the mean image gives zero.
    mean_image = jnp.asarray(mean * 255, jnp.float32).reshape(1, 1, 1, 3)
    np.testing.assert_allclose(data.normalize(mean_image, "cifar100"), 0.0, atol=1e-5)


# ---------------------------------------------------------------------------
# Batch indices


def test_epoch_permutation():
    p = data.epoch_permutation(3, 7, 1000)
    assert p.dtype == np.int32
    np.testing.assert_array_equal(np.sort(p), np.arange(1000))
    np.testing.assert_array_equal(p, data.epoch_permutation(3, 7, 1000))
    assert not np.array_equal(p, data.epoch_permutation(3, 8, 1000))
    assert not np.array_equal(p, data.epoch_permutation(4, 7, 1000))


def test_train_batches_resume():
    n, batch = 103, 10
    full = list(data.train_batches(n, batch, seed=0, epoch=2))
    assert len(full) == data.steps_per_epoch(n, batch) == 10
    assert all(b.shape == (batch,) and b.dtype == np.int32 for b in full)
    flat = np.concatenate(full)
    assert len(set(flat.tolist())) == 100 and flat.max() < n  # no repeats, remainder dropped
    for k in (0, 1, 7, 10):
        tail = list(data.train_batches(n, batch, seed=0, epoch=2, start_step=k))
        assert len(tail) == 10 - k
        for a, b in zip(tail, full[k:], strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        data.train_batches(n, batch, seed=0, epoch=2, start_step=11)
    with pytest.raises(ValueError):
        data.train_batches(5, 10, seed=0, epoch=0)


@pytest.mark.parametrize(("n", "batch"), [(10, 3), (9, 3), (1, 8), (0, 4)])
def test_eval_batches_cover_once(n, batch):
    seen = []
    for indices, mask in data.eval_batches(n, batch):
        assert indices.shape == mask.shape == (batch,)
        assert indices.dtype == np.int32 and mask.dtype == bool
        seen.extend(indices[mask].tolist())
        assert (indices[~mask] == 0).all()
    assert sorted(seen) == list(range(n))
