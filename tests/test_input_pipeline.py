"""Tests for dirac_jax.input_pipeline and the streamed readers of dirac_jax.data.

Real JPEGs come from the `image_tree` fixture (Fashion-MNIST, conftest.py), the
TFDS ArrayRecord dataset from `tfds_imagenet`; nothing needs TensorFlow.
"""

import hashlib
import importlib.util
import io
import sys

import _image_data
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dirac_jax import checkpoint, data, input_pipeline, sharding
from dirac_jax.configs import imagenet_dirac


def _stream_config(tree, **overrides):
    """configs/imagenet_dirac.py on the image tree, at 32 px and batch 8."""
    config = imagenet_dirac.get_config()
    config.dataset.source = "folder"
    config.dataset.data_dir = str(tree)
    config.dataset.image_size = 32
    config.dataset.num_workers = 0
    config.batch_size = config.eval_batch_size = 8
    config.seed = 3
    for key, value in overrides.items():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
    return config


def _digest(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# ---------------------------------------------------------------------------
# Readers.


def test_image_folder_reads_the_imagenet_layout(image_tree, tmp_path):
    train_split = data.ImageFolder(image_tree, "train")
    assert train_split.classes == ("00_tshirt", "01_trouser", "02_pullover", "03_dress")
    assert len(train_split) == 24 and train_split.num_classes == 4
    val = data.ImageFolder(image_tree, "validation", train_split.classes)
    assert len(val) == 12
    for i in range(len(val)):
        record = val[i]
        assert record["label"] == int(val.file_name(i)[:2])  # the sorted folder's index
        assert PIL.Image.open(io.BytesIO(record["image"])).format == "JPEG"
    # Val folders that train lacks are an error; fewer val folders are fine (labels agree).
    (tmp_path / "train" / "b").mkdir(parents=True)
    (tmp_path / "train" / "b" / "x.jpg").write_bytes(
        _image_data.encode_jpeg(np.zeros((4, 4, 3), np.uint8))
    )
    (tmp_path / "val" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a" / "y.png").write_bytes(b"")
    with pytest.raises(ValueError, match="class folders the training split lacks, e.g. 'a'"):
        data.open_stream("imagenet2012", "folder", "val", tmp_path, classes=("b",))
    with pytest.raises(data.DataNotFoundError, match=r"DIR/train/<class>/\*\.JPEG"):
        data.ImageFolder(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="needs --config.dataset.data_dir=DIR"):
        data.open_stream("imagenet2012", "folder", "train", None)


def test_tfds_array_record_source_holds_the_same_images_without_tensorflow(
    image_tree, tfds_imagenet
):
    folder = data.ImageFolder(image_tree, "val", data.ImageFolder(image_tree, "train").classes)
    source = data.open_stream("imagenet2012", "tfds", "val", tfds_imagenet)
    assert len(source) == len(folder) == 12 and source.num_classes == 1000
    by_content = sorted((_digest(np.frombuffer(r["image"], np.uint8)), r["label"]) for r in
                        (source[i] for i in range(len(source))))  # fmt: skip
    expected = sorted((_digest(np.frombuffer(r["image"], np.uint8)), r["label"]) for r in
                      (folder[i] for i in range(len(folder))))  # fmt: skip
    assert by_content == expected  # the same encoded bytes and labels
    assert importlib.util.find_spec("tensorflow") is None and "tensorflow" not in sys.modules
    with pytest.raises(data.DataNotFoundError, match="--file_format=array_record"):
        data.open_stream("imagenet2012", "tfds", "train", image_tree / "no_tfds_here")


def test_small_dataset_from_tfds_array_record(tmp_path):
    if not _image_data.FASHION_DIR.is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    import tensorflow_datasets as tfds

    images = data.read_idx(_image_data.FASHION_DIR / "t10k-images-idx3-ubyte.gz")[:20, :, :, None]
    labels = data.read_idx(_image_data.FASHION_DIR / "t10k-labels-idx1-ubyte.gz")[:20]

    def examples():
        for i in range(20):
            buffer = io.BytesIO()
            PIL.Image.fromarray(images[i, :, :, 0]).save(buffer, format="PNG")
            yield i, {"image": buffer.getvalue(), "label": int(labels[i])}

    class TinyMnist(tfds.builder_cls("mnist"), skip_registration=True):
        name = "mnist"

        def _split_generators(self, dl_manager):
            return {"train": examples(), "test": examples()}

    TinyMnist(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    ds = data.load("mnist", source="tfds", data_dir=tmp_path, split="test")
    assert ds.images.shape == (20, 28, 28, 1) and ds.labels.dtype == np.int32
    # TFDS shuffles the order on write; the set of (image, label) pairs is the one written.
    assert sorted(map(_digest, ds.images)) == sorted(map(_digest, images))
    pairs = {(_digest(x), int(y)) for x, y in zip(images, labels, strict=True)}
    assert {(_digest(x), int(y)) for x, y in zip(ds.images, ds.labels, strict=True)} == pairs


# ---------------------------------------------------------------------------
# Transforms.


def test_random_resized_crop_box_follows_the_inception_ranges():
    rng = np.random.default_rng(0)
    fractions, ratios = [], []
    for _ in range(300):
        left, top, w, h = data.random_resized_crop_box(rng, 400, 300)
        assert 0 <= left and left + w <= 400 and 0 <= top and top + h <= 300
        fractions.append(w * h / (400 * 300))
        ratios.append(w / h)
    assert 0.07 < min(fractions) and max(fractions) <= 1.0 and np.ptp(fractions) > 0.5
    assert 0.74 < min(ratios) and max(ratios) < 1.35
    # Same generator state, same box; nothing fits a 50:1 strip: the centred 4:3 fallback.
    a = data.random_resized_crop_box(np.random.default_rng(7), 400, 300)
    assert a == data.random_resized_crop_box(np.random.default_rng(7), 400, 300)
    assert data.random_resized_crop_box(rng, 500, 10) == (243, 0, 13, 10)


def _gradient_image(width, height):
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    return np.concatenate([x + 0 * y, 0 * x + y, (x + y) / 2], axis=-1).astype(np.uint8)


def test_eval_image_is_resize_then_centre_crop():
    image = _gradient_image(300, 200)
    encoded = _image_data.encode_jpeg(image)
    out = data.eval_image(encoded, 56)
    assert out.shape == (56, 56, 3) and out.dtype == np.uint8
    # The two-step reference: shorter side to 64 (= 56 * 256/224), then the centre 56.
    decoded = PIL.Image.open(io.BytesIO(encoded)).convert("RGB")
    resized = np.asarray(decoded.resize((96, 64), PIL.Image.BILINEAR))
    reference = resized[4:60, 20:76]
    assert np.abs(out.astype(int) - reference).mean() < 2.0
    # A frame outside the centre crop never shows.
    framed = np.zeros((200, 300, 3), np.uint8)
    framed[:, :60] = framed[:, -60:] = 255
    assert data.eval_image(_image_data.encode_jpeg(framed), 56).max() < 40


def test_train_image_is_a_deterministic_crop_and_flip():
    encoded = _image_data.encode_jpeg(_gradient_image(120, 90))
    outs = [data.train_image(encoded, data.example_rng(0, 5, r), 32)
            for r in range(40)]  # fmt: skip
    assert all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in outs)
    again = data.train_image(encoded, data.example_rng(0, 5, 3), 32)
    np.testing.assert_array_equal(again, outs[3])
    assert len({_digest(o) for o in outs}) == 40  # every example its own crop
    # The red channel rises left to right; a flipped crop falls.
    slopes = [np.sign(int(o[16, -2, 0]) - int(o[16, 1, 0])) for o in outs]
    assert 8 < slopes.count(-1) < 32 and slopes.count(-1) + slopes.count(1) == 40


# ---------------------------------------------------------------------------
# Host slices and their assembly.


def test_process_rows_and_shard_batch_do_not_assume_contiguous_hosts():
    devices = jax.devices()
    order = [0, 4, 1, 5, 2, 6, 3, 7]  # a mesh that interleaves two "hosts" of 4 devices
    mesh = Mesh(np.asarray([devices[i] for i in order]), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    host_a = input_pipeline.process_rows(sharding, 16, devices=devices[:4])
    host_b = input_pipeline.process_rows(sharding, 16, devices=devices[4:])
    assert host_a.tolist() == [0, 1, 4, 5, 8, 9, 12, 13]
    assert host_b.tolist() == [2, 3, 6, 7, 10, 11, 14, 15]
    rows = input_pipeline.process_rows(sharding, 16)  # one process: all of them
    batch = np.arange(16) * 10
    out = input_pipeline.shard_batch(mesh, batch[rows], rows=rows, global_size=16)
    for shard in out.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), batch[shard.index[0]])
    np.testing.assert_array_equal(np.asarray(out), batch)


def test_global_batches_do_not_depend_on_host_split_or_workers(image_tree):
    config = _stream_config(image_tree)
    inputs = input_pipeline.StreamedInput(config, sharding.make_mesh())
    assert inputs.num_classes == 4 and inputs.steps_per_epoch == 3

    def maker(rows):
        return input_pipeline.TrainBatchMaker(inputs.train_source, np.asarray(rows), 3, 8, 32)

    whole, half_a, half_b = maker(range(8)), maker([0, 1, 4, 5]), maker([2, 3, 6, 7])
    for step in (0, 4):  # epochs 0 and 1
        full = whole(step)
        a, b = half_a(step), half_b(step)
        np.testing.assert_array_equal(full["image"][[0, 1, 4, 5]], a["image"])
        np.testing.assert_array_equal(full["image"][[2, 3, 6, 7]], b["image"])
        np.testing.assert_array_equal(full["label"][[2, 3, 6, 7]], b["label"])
    assert not np.array_equal(whole(0)["image"], whole(3)["image"])
    # An epoch visits 24 distinct images; Grain's worker processes change nothing.
    seen = np.concatenate([whole(s)["label"] for s in range(3)])
    assert np.bincount(seen, minlength=4).tolist() == [6, 6, 6, 6]
    reference = [whole(s) for s in range(4)]
    workers = input_pipeline.grain_iterator(whole, 0, 4, num_workers=2)
    for expected in reference:
        got = next(workers)
        assert int(got["step"]) == int(expected["step"])
        np.testing.assert_array_equal(got["image"], expected["image"])
    workers.close()
    # seek: a fresh iterator placed at step 2 yields step 2's batch.
    batches = input_pipeline.StreamedInput(config, sharding.make_mesh()).train_batches()
    batches.seek(2)
    (placed,) = next(batches)
    np.testing.assert_array_equal(np.asarray(placed["image"]), reference[2]["image"])


def test_streamed_eval_covers_every_image_once(image_tree):
    config = _stream_config(image_tree, eval_batch_size=16)
    inputs = input_pipeline.StreamedInput(config, sharding.make_mesh())
    expected = np.stack([data.eval_image(inputs.test_source[i]["image"], 32) for i in range(12)])
    batches = [b for (b,) in inputs.eval_batches()]
    assert len(batches) == 1 and int(np.sum(batches[0]["mask"])) == 12
    np.testing.assert_array_equal(np.asarray(batches[0]["image"])[:12], expected)
    # Two hosts, each with its half of the rows: together every image once.
    makers = [
        input_pipeline.EvalBatchMaker(inputs.test_source, np.asarray(rows), 8, 32)
        for rows in ([0, 1, 2, 3], [4, 5, 6, 7])
    ]
    counted = np.zeros(12, int)
    for index in range(2):
        for maker in makers:
            out = maker(index)
            positions = index * 8 + maker.rows
            counted[positions[out["mask"]]] += 1
            np.testing.assert_array_equal(
                out["image"][out["mask"]], expected[positions[out["mask"]]]
            )
    assert counted.tolist() == [1] * 12


def test_data_position_is_saved_and_restored_with_the_checkpoint(image_tree, tmp_path):
    config = _stream_config(image_tree)
    inputs = input_pipeline.StreamedInput(config, sharding.make_mesh())
    batches = inputs.train_batches()
    reference = [np.asarray(next(batches)[0]["image"]) for _ in range(5)]

    batches = inputs.train_batches()
    for _ in range(3):
        next(batches)
    mngr = checkpoint.create_manager(tmp_path)
    checkpoint.save(mngr, 3, {"w": jnp.ones(2)}, data=batches)
    mngr.wait_until_finished()
    assert (tmp_path / "checkpoints" / "3" / "data" / "process_0-of-1.json").is_file()
    resumed = inputs.train_batches()
    assert checkpoint.restore_data(mngr, 3, resumed) and resumed.position == 3
    np.testing.assert_array_equal(np.asarray(next(resumed)[0]["image"]), reference[3])
    # A position that disagrees with the training step is caught at the first batch.
    wrong = inputs.train_batches()
    checkpoint.restore_data(mngr, 3, wrong)
    wrong.position = 2
    with pytest.raises(RuntimeError, match="input pipeline is at step 3 but training is at step 2"):
        next(wrong)
    mngr.close()


def test_data_position_with_worker_processes(image_tree, tmp_path):
    # Two Grain workers interleave their shards of the steps; the saved position is their
    # iterator's own state (Grain has no set_next_index for it). A run placed by `seek`
    # (no saved state) starts its iterator at that step and saves where it began.
    config = _stream_config(image_tree, **{"dataset.num_workers": 2})
    inputs = input_pipeline.StreamedInput(config, sharding.make_mesh())
    maker = input_pipeline.TrainBatchMaker(inputs.train_source, inputs.train_rows, 3, 8, 32)
    reference = [maker(step)["image"] for step in range(8)]
    mngr = checkpoint.create_manager(tmp_path)
    batches = inputs.train_batches()
    batches.seek(2)
    for step in (2, 3, 4):
        np.testing.assert_array_equal(np.asarray(next(batches)[0]["image"]), reference[step])
    checkpoint.save(mngr, 5, {"w": jnp.ones(2)}, data=batches)
    mngr.wait_until_finished()
    batches.close()
    origin = tmp_path / "checkpoints" / "5" / checkpoint.DATA_ORIGIN_ITEM
    assert origin.is_dir()
    resumed = inputs.train_batches()
    assert checkpoint.restore_data(mngr, 5, resumed)
    assert resumed.position == 5 and resumed.first_step == 2
    for step in (5, 6, 7):
        np.testing.assert_array_equal(np.asarray(next(resumed)[0]["image"]), reference[step])
    resumed.close()
    # Another worker count cannot take that state: restore_data declines, the step places.
    config.dataset.num_workers = 0
    other = input_pipeline.StreamedInput(config, sharding.make_mesh()).train_batches()
    assert not checkpoint.restore_data(mngr, 5, other)
    mngr.close()
