"""Symmetric kernels in training (the slides): hard and soft, the symmetrized eval, fold, export.

Three tiny runs (2 steps each on real Fashion-MNIST, `train.train_and_evaluate`)
are trained once per module: a hard eigen WRN with bottleneck blocks, a soft
WRN with basic blocks, and a hard symmetric MobileNet that folds and exports.
Every kind of `param.symmetric` takes SGD steps inside a tiny WRN through
`train.train_step`, and folds inside a MobileNet.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import cifar_wrn_symmetric, fashion_mnist_dirac, imagenet_resnet_symmetric
from dirac_jax import (
    data,
    evaluate,
    export,
    fold,
    interop,
    models,
    onnx_export,
    param,
    train,
    workdir,
)
from dirac_jax.reproduce._grid import apply_overrides

FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not FASHION_DIR.is_dir(), reason="dataset-fashion-mnist not installed"
)

TINY = {
    "model.name": "wrn",
    "model.depth": 10,
    "model.width": 0.25,
    "num_train_steps": 2,
    "batch_size": 64,
    "eval_batch_size": 1000,
    "eval_every_steps": 100_000,
    "log_every_steps": 1,
    "checkpoint_every_steps": 0,
    "fold_check_images": 64,
}
RUNS = {
    "eigen_bottleneck": {
        "model.symmetry": "eigen",
        "model.block": "bottleneck",
        "model.depth": 11,
        "model.symmetry_axis": "both",
    },
    "soft": {"symmetry_penalty": 0.05, "model.symmetry_axis": "both"},
    "mobilenet": {
        "model.name": "mobilenet",
        "model.symmetry": "ldl",
        "model.symmetry_axis": "both",
    },
}


def tiny_config(**overrides):
    config = apply_overrides(fashion_mnist_dirac.get_config(), {**TINY, **overrides})
    if config.model.name == "mobilenet":
        del config.model["depth"]
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not FASHION_DIR.is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    out = {}
    for name, overrides in RUNS.items():
        path = tmp_path_factory.mktemp(name)
        out[name] = (path, train.train_and_evaluate(tiny_config(**overrides), path))
    return out


@pytest.fixture(scope="module")
def test_split():
    return data.load("fashion_mnist", split="test")


def _layer(tree, path):
    for name in path:
        tree = tree[name]
    return tree


def _init(model, size=16, channels=1):
    x = jnp.zeros((1, size, size, channels))
    return jax.jit(functools.partial(model.init, train=False))(jax.random.key(0, impl="rbg"), x)


# ---------------------------------------------------------------- the soft constraint


def test_penalty_is_zero_exactly_when_symmetric_and_its_gradient_is_antisymmetric():
    model = models.get_model("wrn", depth=10, width=0.25, symmetry_axis="channel")
    params = _init(model)["params"]
    penalty = models.symmetry_penalty(model, params)
    expected = sum(
        float(param.symmetry_penalty(_layer(params, path)["w"]))
        for path in model.symmetric_layers()
    )
    np.testing.assert_allclose(float(penalty), expected, rtol=1e-6)
    assert expected > 0
    assert float(models.symmetry_penalty(model, models.symmetrize_params(model, params))) == 0.0
    # d/dW sum |W - W^T| = S - S^T (S the signs): a descent step moves W_ij and W_ji together.
    grads = jax.grad(lambda p: models.symmetry_penalty(model, p))(params)
    for path in model.symmetric_layers():
        g = _layer(grads, path)["w"]
        np.testing.assert_allclose(g, -jnp.swapaxes(g, -1, -2), atol=1e-6)
        assert float(jnp.abs(g).max()) > 0
    other = _layer(grads, ("group0_block0", "conv0"))["w"]
    assert float(jnp.abs(other).max()) == 0.0  # only the symmetric convs are penalized


def test_sgd_steps_with_the_penalty_make_the_kernels_more_symmetric():
    config = tiny_config(symmetry_penalty=0.05, learning_rate=0.1)
    config = train.validate_config(config)
    model = train.create_model(config, 10)
    lr = optax.constant_schedule(0.1)
    batch = {
        "image": jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, 32, 32, 1)), jnp.uint8),
        "label": jnp.arange(16) % 10,
    }
    penalty = functools.partial(models.symmetry_penalty, model)
    start = train.create_train_state(config, model, jax.random.key(0), (32, 32, 1), lr)
    after = {}
    for lam in (0.0, 0.05):
        step = jax.jit(
            functools.partial(
                train.train_step,
                learning_rate_fn=lr,
                dataset_name="fashion_mnist",
                seed=0,
                symmetry_penalty=(lam, penalty),
            )
        )
        state = start
        for _ in range(3):
            state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["loss"]))
        after[lam] = float(penalty(state.params))
    before = float(penalty(start.params))
    assert after[0.05] < before
    assert after[0.05] < after[0.0] - 0.01 * before


@needs_fashion
def test_soft_run_reports_the_symmetrized_net_as_evaluated_by_hand(runs, test_split):
    path, summary = runs["soft"]
    assert summary["symmetry_penalty"] == 0.05
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert all("symmetry_penalty" in r for r in records if r["kind"] == "train")
    model, variables, config = workdir.load(path)
    assert config.model.get("symmetry") is None and model.symmetry_axis == "both"
    params = jax.tree.map(lambda a: a, variables["params"])
    for g in range(3):  # conv1 of every block of WRN-10 (1 block per group), by hand
        conv = params[f"group{g}_block0"]["conv1"]
        conv["w"] = param.symmetrize(conv["w"], "both")
    images = workdir.preprocess(jnp.asarray(test_split.images), config)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    for suffix, p in (("", variables["params"]), ("_symmetrized", params)):
        logits = np.concatenate(
            [
                apply({**variables, "params": p}, images[i : i + 2000])
                for i in range(0, len(images), 2000)
            ]
        )
        accuracy = float(np.mean(logits.argmax(-1) == test_split.labels))
        loss = float(
            optax.softmax_cross_entropy_with_integer_labels(logits, test_split.labels).mean()
        )
        assert summary["test_accuracy" + suffix] == pytest.approx(accuracy, abs=1e-6)
        assert summary["test_loss" + suffix] == pytest.approx(loss, rel=1e-4)
    assert summary["test_loss_symmetrized"] != summary["test_loss"]
    # The workdir evaluation reports the same two nets.
    result = evaluate.evaluate_workdir(path)
    assert result["unfolded"]["top1"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
    assert result["symmetrized"]["top1"] == pytest.approx(
        summary["test_accuracy_symmetrized"], abs=1e-6
    )


# ---------------------------------------------------------------- hard symmetry


def _has_structure(m, kind):
    """Whether the trailing squares of `m` have the structure of `kind`."""
    if kind == "chunk4":  # one strip of rows, tiled 4 times
        return np.allclose(m, np.roll(m, m.shape[-2] // 4, axis=-2), atol=1e-6)
    if kind == "block4":  # one quarter, reflected across both axes
        return np.allclose(m, m[..., ::-1, :], atol=1e-6) and np.allclose(m, m[..., ::-1])
    return np.allclose(m, np.swapaxes(m, -1, -2), atol=1e-6)  # transpose-symmetric kinds


def _invariant(kernel, kind, axis):
    """Whether `kernel` is structured as `param.symmetric(kind=kind, axis=axis)` builds it."""
    kernel = np.asarray(kernel)
    spatial = np.moveaxis(kernel, (0, 1), (-2, -1))
    if axis == "spatial":
        return _has_structure(spatial, kind)
    if axis == "both":  # the kind on the channel squares, mirrored spatial triangle
        return _has_structure(kernel, kind) and _has_structure(spatial, "triangular")
    return _has_structure(kernel, kind)


@pytest.mark.parametrize("kind", param.SYMMETRIC_KINDS)
def test_every_kind_trains_in_a_wrn_and_stays_symmetric(kind):
    axis = "channel" if kind == "chunk4" else "both"  # chunk4 needs sides divisible by 4
    model = models.get_model(
        "wrn", depth=10, width=0.25, num_classes=10, symmetry=kind, symmetry_axis=axis
    )
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(8, 16, 16, 1)), jnp.float32)}
    batch["label"] = jnp.arange(8) % 10
    # Eager init: its ops are compiled once for all kinds (a jitted init compiles per kind).
    variables = model.init(jax.random.key(0, impl="rbg"), batch["image"][:1], train=False)
    lr = optax.constant_schedule(0.1)
    state = train.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.sgd(lr),
        batch_stats=variables["batch_stats"],
    )
    step = jax.jit(
        functools.partial(
            train.train_step, learning_rate_fn=lr, dataset_name="fashion_mnist", seed=0
        )
    )
    new, metrics = step(state, batch)
    new, metrics = step(new, batch)
    assert np.isfinite(float(metrics["loss"]))
    for path, layer_axis in model.symmetric_layers().items():
        raw, raw0 = _layer(new.params, path), _layer(state.params, path)
        assert any(not np.array_equal(raw[k], raw0[k]) for k in raw)  # it trained
        kernel = _kernel(model, path, raw, batch["image"].shape[-1])
        assert _invariant(kernel, kind, layer_axis), path


def _kernel(model, path, raw, channels):
    """The effective kernel of the symmetric conv at `path`, shaped from the free model."""
    free = models.get_model("wrn", depth=model.depth, width=model.width, block=model.block)
    shapes = jax.eval_shape(
        lambda: free.init(jax.random.key(0), jnp.zeros((1, 16, 16, channels)), train=False)
    )["params"]
    shape = _layer(shapes, path)["w"].shape
    return param.symmetric(shape, kind=model.symmetry, axis=model.symmetry_axis).apply(raw)


def test_weight_decay_covers_the_raw_numbers_of_symmetric_kernels():
    model = models.get_model("wrn", depth=10, width=0.25, symmetry="eigen")
    params = jax.eval_shape(lambda: _init(model))["params"]
    mask = train.weight_decay_mask(params)
    conv1 = mask["group0_block0"]["conv1"]
    assert set(conv1) == {"q", "lambda"} and all(conv1.values())
    assert not any(jax.tree.leaves(mask["group0_block0"]["bn1"]))
    assert mask["fc"] == {"kernel": True, "bias": False}


@needs_fashion
def test_hard_runs_train_and_residual_nets_refuse_to_export(runs, tmp_path):
    for name in ("eigen_bottleneck", "soft"):
        path, summary = runs[name]
        assert summary["step"] == 2 and np.isfinite(summary["test_loss"])
        assert summary["fold_max_abs_error"] is None  # residual nets do not fold
        if name == "soft":
            with pytest.raises(ValueError, match="does not fold.*residual nets"):
                export.export_workdir(path, "onnx", tmp_path / f"{name}.onnx")
            continue
        assert "test_accuracy_symmetrized" not in summary
        free = tiny_config(**{**RUNS[name], "model.symmetry": None})
        free_model = train.create_model(train.validate_config(free), 10)
        free_params = jax.eval_shape(
            lambda m=free_model: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
        )["params"]
        assert summary["num_params"] < models.count_params(free_params)
        with pytest.raises(ValueError, match="does not fold.*residual nets"):
            export.export_workdir(path, "onnx", tmp_path / f"{name}.onnx")


# ---------------------------------------------------------------- fold and export


@pytest.mark.parametrize("kind", param.SYMMETRIC_KINDS)
def test_symmetric_mobilenet_folds_into_a_chain(kind):
    axis = "channel" if kind == "chunk4" else "both"
    model = models.get_model(
        "mobilenet", width=0.125, num_classes=5, symmetry=kind, symmetry_axis=axis
    )
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = model.init(jax.random.key(0, impl="rbg"), x[:1], train=False)  # eager: see above
    rng = np.random.default_rng(0)
    variables["batch_stats"] = jax.tree_util.tree_map_with_path(  # make the BN fold matter
        lambda path, v: jnp.asarray(
            np.abs(rng.normal(1.0, 0.3, v.shape))
            if path[-1].key == "var"
            else rng.normal(0.0, 0.1, v.shape),
            jnp.float32,
        ),
        variables["batch_stats"],
    )
    got, want = jax.jit(
        lambda v, x: (fold.apply_folded(fold.fold(model, v), x), model.apply(v, x, train=False))
    )(variables, x)
    assert float(jnp.std(want)) > 0.1
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_fold_names_variables_of_another_symmetry():
    free = models.get_model("mobilenet", width=0.125, num_classes=5)
    variables = jax.eval_shape(lambda: _init(free, 32, 3))
    hard = models.get_model("mobilenet", width=0.125, num_classes=5, symmetry="triangular")
    with pytest.raises(ValueError, match="block2.pw.*same variant, width and symmetry"):
        jax.eval_shape(lambda v: fold.fold(hard, v), variables)


@needs_fashion
def test_symmetric_mobilenet_run_folds_and_exports(runs, test_split, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path, summary = runs["mobilenet"]
    assert summary["fold_max_abs_error"] < 1e-4
    out = export.export_workdir(path, "onnx", tmp_path / "mobilenet.onnx")
    folded, config = export.fold_workdir(path)
    assert [s.args[2] for s in folded.steps if s.kind == "conv" and len(s.args) == 3]
    images = np.asarray(test_split.images[:64])
    session = ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    got = session.run(None, {onnx_export.INPUT_NAME: images})[0]
    model, variables, _ = workdir.load(path)
    want = model.apply(variables, workdir.preprocess(jnp.asarray(images), config), train=False)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    out = export.export_workdir(path, "stablehlo", tmp_path / "mobilenet.stablehlo")
    call = interop.load_stablehlo(out.read_bytes())
    np.testing.assert_allclose(call(jnp.asarray(images)), want, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("module", [cifar_wrn_symmetric, imagenet_resnet_symmetric])
@pytest.mark.parametrize("mode", ["hard", "soft", "none"])
def test_symmetric_configs_validate_in_every_mode(module, mode):
    config = train.validate_config(module.get_config(mode))
    assert (config.model.symmetry is not None) == (mode == "hard")
    assert (config.symmetry_penalty > 0) == (mode == "soft")
    with pytest.raises(ValueError, match="unknown mode"):
        module.get_config("sometimes")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"symmetry_penalty": -1.0}, "symmetry_penalty must be"),
        ({"symmetry_penalty_p": 0.5}, "symmetry_penalty_p must be"),
        ({"symmetry_penalty": 0.1, "model.name": "diracnet"}, "has none"),
        ({"symmetry_penalty": 0.1, "model.symmetry": "ldl"}, "make the penalty zero"),
        ({"max_norm": 1.0, "model.symmetry": "ldl"}, "max_norm=0"),
        ({"model.symmetry": "upper"}, "unknown symmetry 'upper'"),
        ({"model.block": "bottleneck"}, "9n\\+2"),
    ],
)
def test_validate_config_names_the_symmetry_problem(overrides, message):
    with pytest.raises(train.ConfigError, match=message):
        train.validate_config(tiny_config(**overrides))
