"""Symmetric kernels in training (the slides): hard and soft, the symmetrized eval, fold, export.

One tiny run (2 steps on real Fashion-MNIST, `train.train_and_evaluate`) is
trained once per module: a WRN with the soft symmetry penalty, which the
trainer evaluates as trained and symmetrized, folds (`fold.fold_kernels`) and
exports to StableHLO. A hard symmetric WRN trains through the CLI. A hard
symmetric MobileNet folds and exports (ONNX, StableHLO). Every kind of
`param.symmetric` takes SGD steps inside a tiny WRN through `steps.train_step`
and folds, run eagerly: once the first kind has compiled the ops, a kind costs a second or
two, where a jitted step would compile a new program for each.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _bn import random_bn_stats

from dirac_jax import (
    config_schema,
    data,
    evaluate,
    export,
    fold,
    models,
    optim,
    param,
    steps,
    train,
    workdir,
)
from dirac_jax.configs import cifar_wrn_symmetric, fashion_mnist_dirac, imagenet_resnet_symmetric
from dirac_jax.formats import onnx_graph, stablehlo
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
SOFT = {"model.symmetry_axis": "both", "symmetry_penalty": 0.05}


def tiny_config(**overrides):
    config = apply_overrides(fashion_mnist_dirac.get_config(), {**TINY, **overrides})
    if config.model.name == "mobilenet":
        del config.model["depth"]
    return config


@pytest.fixture(scope="module")
def soft_run(tmp_path_factory):
    if not FASHION_DIR.is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    path = tmp_path_factory.mktemp("soft_wrn")
    return path, train.train_and_evaluate(tiny_config(**SOFT), path)


@pytest.fixture(scope="module")
def test_split():
    return data.load("fashion_mnist", split="test")


def _layer(tree, path):
    for name in path:
        tree = tree[name]
    return tree


def _batch(n=8, size=16):
    rng = np.random.default_rng(0)
    return {
        "image": jnp.asarray(rng.normal(size=(n, size, size, 1)), jnp.float32),
        "label": jnp.arange(n) % 10,
    }


def _state(model, batch):
    """An SGD train state, initialized eagerly (its ops are shared across kinds)."""
    variables = model.init(jax.random.key(0, impl="rbg"), batch["image"][:1], train=False)
    return steps.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.sgd(0.1),
        batch_stats=variables["batch_stats"],
    )


STEP = {"learning_rate_fn": optax.constant_schedule(0.1), "dataset_name": "mnist", "seed": 0}


# ---------------------------------------------------------------- the soft constraint


def test_penalty_is_zero_exactly_when_symmetric_and_its_gradient_is_antisymmetric():
    model = models.get_model("wrn", depth=10, width=0.25, symmetry_axis="channel")
    params = _state(model, _batch()).params
    penalty = models.network_symmetry_penalty(model, params)
    expected = sum(
        float(param.symmetry_penalty(_layer(params, path)["w"]))
        for path in model.symmetric_layers()
    )
    np.testing.assert_allclose(float(penalty), expected, rtol=1e-6)
    assert expected > 0
    assert (
        float(models.network_symmetry_penalty(model, models.symmetrize_params(model, params)))
        == 0.0
    )
    # d/dW sum |W - W^T| = S - S^T (S the signs): a descent step moves W_ij and W_ji together.
    grads = jax.grad(lambda p: models.network_symmetry_penalty(model, p))(params)
    for path in model.symmetric_layers():
        g = _layer(grads, path)["w"]
        np.testing.assert_allclose(g, -jnp.swapaxes(g, -1, -2), atol=1e-6)
        assert float(jnp.abs(g).max()) > 0
    other = _layer(grads, ("group0_block0", "conv0"))["w"]
    assert float(jnp.abs(other).max()) == 0.0  # only the symmetric convs are penalized


def test_sgd_steps_with_the_penalty_make_the_kernels_more_symmetric():
    model = models.get_model("wrn", depth=10, width=0.25, num_classes=10, symmetry_axis="both")
    batch = _batch(16)
    start = _state(model, batch)
    penalty = functools.partial(models.network_symmetry_penalty, model)

    @jax.jit
    def three_steps(state, lam):  # lambda traced: one program for both runs
        for _ in range(3):
            state, metrics = steps.train_step(state, batch, **STEP, symmetry_penalty=(lam, penalty))
        return penalty(state.params), metrics

    before = float(penalty(start.params))
    after = {}
    for lam in (0.0, 0.05):
        value, metrics = three_steps(start, lam)
        assert np.isfinite(float(metrics["loss"]))
        after[lam] = float(value)
    assert after[0.05] < before
    assert after[0.05] < after[0.0] - 0.01 * before


@needs_fashion
def test_soft_run_reports_the_symmetrized_net_as_evaluated_by_hand(soft_run, test_split):
    path, summary = soft_run
    assert summary["symmetry_penalty"] == 0.05 and summary["symmetry"] is None
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert all("symmetry_penalty" in r for r in records if r["kind"] == "train")
    model, variables, config = workdir.load(path)
    assert model.symmetry is None and model.symmetry_axis == "both"
    # By hand: the second conv of each of the 3 blocks of WRN-10, on both squares.
    params = jax.tree.map(lambda a: a, variables["params"])
    for g in range(3):
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
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, test_split.labels)
        assert summary["test_top1" + suffix] == pytest.approx(accuracy, abs=1e-6)
        assert summary["test_loss" + suffix] == pytest.approx(float(losses.mean()), rel=1e-4)
    assert summary["test_loss_symmetrized"] != summary["test_loss"]
    # The workdir evaluation reports the same nets, and the kernel-folded one.
    result = evaluate.evaluate_workdir(path)
    assert result["unfolded"]["top1"] == pytest.approx(summary["test_top1"], abs=1e-6)
    assert result["symmetrized"]["top1"] == pytest.approx(
        summary["test_top1_symmetrized"], abs=1e-6
    )
    assert result["folded"]["top1"] == pytest.approx(summary["test_top1"], abs=1e-3)
    assert summary["fold_max_abs_error"] < 1e-4 and summary["fold_check_images"] == 64


@needs_fashion
def test_residual_run_exports_onnx_and_stablehlo(soft_run, test_split, tmp_path):
    import onnxruntime as ort

    path, summary = soft_run
    model, variables, config = workdir.load(path)
    images = test_split.images[:500]
    expected = model.apply(variables, workdir.preprocess(images, config), train=False)
    out = export.export_workdir(path, "stablehlo", tmp_path / "wrn.stablehlo")
    call = stablehlo.load_stablehlo(out.read_bytes())
    np.testing.assert_allclose(call(jnp.asarray(images)), expected, atol=1e-4, rtol=0)
    out = export.export_workdir(path, "onnx", tmp_path / "wrn.onnx")
    session = ort.InferenceSession(str(out))
    logits = session.run(None, {onnx_graph.INPUT_NAME: np.asarray(images)})[0]
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="a residual net.*Write it as .onnx. or .stablehlo."):
        export.export_workdir(path, "reference", tmp_path / "m")


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
    if axis == "both":  # the kind on the channel squares, a mirrored spatial triangle
        return _has_structure(kernel, kind) and _has_structure(spatial, "triangular")
    return _has_structure(kernel, kind)


@pytest.mark.parametrize("kind", param.SYMMETRIC_KINDS)
def test_every_kind_trains_in_a_wrn_and_stays_symmetric(kind):
    # Basic blocks only: test_models checks the bottleneck's symmetric conv by its forward.
    axis = "channel" if kind == "chunk4" else "both"  # chunk4 needs sides divisible by 4
    kwargs = dict(depth=10, width=0.25, num_classes=10)
    model = models.get_model("wrn", symmetry=kind, symmetry_axis=axis, **kwargs)
    batch = _batch()
    state = _state(model, batch)
    new, metrics = steps.train_step(state, batch, **STEP)
    new, metrics = steps.train_step(new, batch, **STEP)
    assert np.isfinite(float(metrics["loss"]))
    free = models.get_model("wrn", **kwargs)
    shapes = jax.eval_shape(lambda: free.init(jax.random.key(0), batch["image"][:1]))["params"]
    for path, layer_axis in model.symmetric_layers().items():
        raw, raw0 = _layer(new.params, path), _layer(state.params, path)
        assert any(not np.array_equal(raw[k], raw0[k]) for k in raw)  # it trained
        shape = _layer(shapes, path)["w"].shape
        kernel = param.symmetric(shape, kind=kind, axis=layer_axis).apply(raw)
        assert _invariant(kernel, kind, layer_axis), path
    # It folds: the same WRN with plain kernels computes the trained net's logits.
    variables = {"params": new.params, "batch_stats": new.batch_stats}
    plain, plain_variables = fold.fold_kernels(model, variables)
    folded_kernel = _layer(plain_variables["params"], ("group1_block0", "conv1"))["w"]
    assert _invariant(folded_kernel, kind, axis)
    np.testing.assert_allclose(
        plain.apply(plain_variables, batch["image"]),
        model.apply(variables, batch["image"]),
        atol=1e-5,
        rtol=1e-5,
    )


def test_weight_decay_covers_the_raw_numbers_of_symmetric_kernels():
    model = models.get_model("wrn", depth=10, width=0.25, symmetry="eigen")
    x = jnp.zeros((1, 16, 16, 1))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
    mask = optim.weight_decay_mask(params)
    conv1 = mask["group0_block0"]["conv1"]
    assert set(conv1) == {"q", "lambda"} and all(conv1.values())
    assert not any(jax.tree.leaves(mask["group0_block0"]["bn1"]))
    assert mask["fc"] == {"kernel": True, "bias": False}


@pytest.mark.parametrize("module", [cifar_wrn_symmetric, imagenet_resnet_symmetric])
def test_residual_runs_refuse_the_reference_format_before_reading_a_checkpoint(module, tmp_path):
    # config.json only: the refusal comes before any checkpoint is read.
    (tmp_path / workdir.CONFIG_FILE).write_text(json.dumps(module.get_config().to_dict()))
    with pytest.raises(ValueError, match="residual net.*published PyTorch DiracNet"):
        export.export_workdir(tmp_path, "reference", tmp_path / "model.pth")


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("wrn", dict(depth=10, width=0.25, symmetry="triangular", symmetry_axis="both")),
        ("wrn", dict(depth=11, width=0.25, block="bottleneck", symmetry="eigen")),
        ("resnet", dict(depth=18, width=0.125, symmetry="ldl")),
        ("resnet", dict(depth=50, width=0.0625, dirac_init_sigma=0.1)),
    ],
)
def test_residual_onnx_computes_the_model_in_onnxruntime(name, kwargs):
    import onnxruntime as ort

    model = models.get_model(name, num_classes=5, **kwargs)
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
    variables["batch_stats"] = random_bn_stats(variables["batch_stats"])
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    proto = onnx_graph.residual_to_onnx(
        model, variables, input_shape=(28, 28, 3), pad=((2, 2), (2, 2)), mean=mean, std=std
    )
    images = np.random.default_rng(1).integers(0, 256, (4, 28, 28, 3), dtype=np.uint8)
    got = ort.InferenceSession(proto.SerializeToString()).run(None, {"images": images})[0]
    padded = jnp.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))).astype(jnp.float32)
    want = model.apply(variables, (padded / 255 - jnp.array(mean)) / jnp.array(std), train=False)
    scale = max(1.0, float(jnp.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=0)
    with pytest.raises(ValueError, match="chains .* go through fold"):
        onnx_graph.residual_to_onnx(
            models.get_model("diracnet", depth=10, width=0.25), variables,
            input_shape=(28, 28, 3), mean=mean, std=std,
        )  # fmt: skip


@needs_fashion
def test_hard_symmetric_wrn_trains_through_the_cli_and_folds(tmp_path):
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    args = [f"--config.{k}={v}" for k, v in {**TINY, "dataset.name": "fashion_mnist"}.items()]
    proc = subprocess.run(
        [sys.executable, "-m", "dirac_jax.main", "--config=configs/cifar_wrn_symmetric.py",
         f"--workdir={tmp_path}", "--config.model.symmetry=ldl", "--config.augment=False",
         *args],
        capture_output=True, text=True, cwd=root, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / workdir.SUMMARY_FILE).read_text())
    assert summary["symmetry"] == "ldl" and summary["step"] == 2
    assert summary["fold_max_abs_error"] < 1e-4 and summary["fold_check_images"] == 64


# ---------------------------------------------------------------- fold and export


def test_hard_symmetric_mobilenet_folds_into_a_chain():
    # Symmetric spatially in the depthwise convs, over channels in the square pointwise ones.
    model = models.get_model(
        "mobilenet", width=0.125, num_classes=5, symmetry="triangular", symmetry_axis="both"
    )
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = model.init(jax.random.key(0, impl="rbg"), x[:1], train=False)
    variables["batch_stats"] = random_bn_stats(variables["batch_stats"])
    folded = jax.jit(lambda v: fold.fold(model, v))(variables)
    grouped = [s.args[2] for s in folded.steps if s.kind == "conv" and len(s.args) == 3]
    assert len(grouped) == 13  # the depthwise convs
    got, want = jax.jit(lambda v, f, x: (fold.apply_folded(f, x), model.apply(v, x, train=False)))(
        variables, folded, x
    )
    assert float(jnp.std(want)) > 0.1
    np.testing.assert_allclose(got, want, atol=1e-4)
    # Exported: ONNX (grouped Conv) run by onnxruntime, and StableHLO.
    ort = pytest.importorskip("onnxruntime")
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x = (jnp.asarray(images, jnp.float32) / 255 - 0.5) / 0.25
    want = model.apply(variables, x, train=False)
    onnx_model = onnx_graph.to_onnx(
        folded, input_shape=(32, 32, 3), mean=(0.5,) * 3, std=(0.25,) * 3
    )
    session = ort.InferenceSession(
        onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {onnx_graph.INPUT_NAME: images})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    call = stablehlo.load_stablehlo(stablehlo.export_stablehlo(folded, (1, 32, 32, 3)))
    np.testing.assert_allclose(call(x), want, atol=1e-4, rtol=1e-5)


def test_fold_names_variables_of_another_symmetry():
    free = models.get_model("mobilenet", width=0.125, num_classes=5)
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(lambda: free.init(jax.random.key(0), x, train=False))
    hard = models.get_model("mobilenet", width=0.125, num_classes=5, symmetry="triangular")
    with pytest.raises(ValueError, match="block2.pw.*same variant, width and symmetry"):
        jax.eval_shape(lambda v: fold.fold(hard, v), variables)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("module", [cifar_wrn_symmetric, imagenet_resnet_symmetric])
@pytest.mark.parametrize("mode", ["hard", "soft", "none"])
def test_symmetric_configs_validate_in_every_mode(module, mode):
    config = config_schema.validate_config(module.get_config(mode))
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
    with pytest.raises(config_schema.ConfigError, match=message):
        config_schema.validate_config(tiny_config(**overrides))
