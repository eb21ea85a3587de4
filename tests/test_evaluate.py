"""`python -m dirac_jax.evaluate`: the trainer's metrics, any device count, only the val split.

(The bf16 run whose eval.json must equal its summary.json is in test_bucket.py, where it
also runs from a bucket.)
"""

import json
import shutil

import _image_data
import _multihost_worker
import jax.numpy as jnp
import numpy as np
import pytest

from dirac_jax import data, evaluate, steps, train, workdir

_multihost_worker.use_compilation_cache()


def test_evaluate_and_the_trainer_share_one_strict_metrics_function():
    with pytest.raises(AttributeError, match="use dirac_jax.steps.classification_metrics"):
        evaluate.metrics_of  # noqa: B018  (the old second name, removed)
    # bfloat16 logits tie often. Row 0: the label (class 5) ties with class 4 for 5th place;
    # strict top-k ranks class 4 first, so it is no top-5 hit. Row 1: the label is class 4.
    row = [6.0, 5.0, 4.0, 3.0, 1.0, 1.0, 0.0]
    logits = jnp.asarray([row, row], jnp.bfloat16)
    m = steps.classification_metrics(logits, jnp.array([5, 4]), jnp.array([True, True]))
    assert (int(m["top1"]), int(m["top5"]), int(m["count"])) == (0, 1, 2)
    # The loss is float32 cross-entropy of the float32-cast logits.
    expected = -np.log(np.exp(1.0) / np.exp(np.array(row)).sum())
    np.testing.assert_allclose(float(m["loss_sum"]), 2 * expected, rtol=1e-6)
    masked = steps.classification_metrics(logits, jnp.array([5, 4]), jnp.array([False, True]))
    assert (int(masked["top5"]), int(masked["count"])) == (1, 1)


@pytest.mark.slow
def test_streamed_evaluate_reads_only_val_and_rounds_the_batch(tmp_path, image_tree):
    tree = shutil.copytree(image_tree, tmp_path / "tree")
    run = tmp_path / "run"
    summary = train.train_and_evaluate(_image_data.tiny_imagenet_config(tree, 3), run)
    # Evaluation must not need the training images: only train/'s class folders remain.
    for image in (tree / "train").glob("*/*"):
        image.unlink()
    assert data.folder_classes(tree) == tuple(sorted(p.name for p in (tree / "val").iterdir()))

    result = evaluate.evaluate_workdir(run)
    assert result["unfolded"]["count"] == summary["num_test_examples"] == 12
    assert result["unfolded"]["top1"] == summary["test_top1"]
    assert result["unfolded"]["top5"] == summary["test_top5"]
    assert result["batch_size"] == 16 and result["devices"] == 8
    assert json.loads((run / workdir.EVAL_FILE).read_text()) == result

    # 6 images per pass on 8 devices: rounded up to 8, every image counted once.
    odd = evaluate.evaluate_workdir(run, batch_size=6)
    assert odd["batch_size"] == 8 and odd["unfolded"]["count"] == 12
    np.testing.assert_allclose(odd["unfolded"]["loss"], result["unfolded"]["loss"], rtol=1e-5)
