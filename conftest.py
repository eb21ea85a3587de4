"""Collection rules for the whole tree (tests/ and the doctests of dirac_jax/).

PyTorch is optional. `dirac_jax.torch_reference` imports it when a function
runs, so every module is collected without it; the tests that need it skip
themselves (`pytest.importorskip("torch")`).

`SLOW` lists the tests that train a model, start command lines or worker
processes, or share a fixture that does (each over about 20 s on 2 CPU cores),
and the in-process tests of over about 5 s there. They get the `slow` marker
here, in one place, so `pytest -m "not slow"` is the quick loop. A new test
that trains marks itself `@pytest.mark.slow`.
"""

import fnmatch

import pytest

SLOW = (
    # Trained workdirs (module- and session-scoped fixtures) and the command lines on them.
    "tests/test_export.py::test_load_restores_the_trained_model",
    "tests/test_export.py::test_evaluate_*",
    "tests/test_export.py::test_onnx_export_in_onnxruntime_equals_jax_and_the_summary",
    "tests/test_export.py::test_stablehlo_export_is_the_whole_classifier",
    "tests/test_export.py::test_reference_export_names_what_it_needs",
    "tests/test_symmetric.py::test_soft_run_*",
    "tests/test_symmetric.py::test_residual_run_*",
    "tests/test_symmetric.py::test_hard_symmetric_wrn_trains_through_the_cli_and_folds",
    "tests/test_reproduce.py::test_smoke_*",
    "tests/test_reproduce.py::test_depth_medians_are_over_the_seeds",
    "tests/test_reproduce.py::test_rerun_*",
    "tests/test_reproduce.py::test_symmetric_reports_*",
    "tests/test_torch_checkpoint.py::test_load_reference_folded_*",
    "tests/test_torch_checkpoint.py::test_export_reference_folded_*",
    # Runs of the trainer: resume, preemption, NaN, corrupt and partial checkpoints.
    "tests/test_checkpoint.py::test_corrupt_checkpoint_*",
    "tests/test_checkpoint.py::test_partial_step_*",
    "tests/test_checkpoint.py::test_resume_refuses_*",
    "tests/test_checkpoint.py::test_nan_loss_*",
    "tests/test_checkpoint.py::test_*sigterm*",
    "tests/test_train.py::test_train_step_on_8_devices_equals_1_device",
    "tests/test_train.py::test_two_processes_*",
    "tests/test_train.py::test_tfds_array_record_source_trains_end_to_end",
    "tests/test_train.py::test_fashion_mnist_learns_and_writes_every_artifact",
    "tests/test_reference_training.py::*",
    # Command lines and worker processes started from scratch.
    "tests/test_main.py::test_bad_config_through_the_command_line",
    "tests/test_main.py::test_imagenet_without_its_data_says_how_to_build_it",
    "tests/test_input_pipeline.py::test_data_position_with_worker_processes",
    "tests/test_input_pipeline.py::test_global_batches_do_not_depend_on_host_split_or_workers",
    "tests/test_bench.py::test_bench_compile_reports_ratios_of_one_run",
    "tests/test_bench.py::test_torch_candidates_train_the_same_model",
    # In-process, over about 5 s each on an idle 2-core AMD EPYC (`--durations`); together
    # they were 170 s of the quick loop's 270 s of CPU beyond its 3-minute goal.
    "tests/test_symmetric.py::test_every_kind_trains_in_a_wrn_and_stays_symmetric*",
    "tests/test_symmetric.py::test_residual_onnx_computes_the_model_in_onnxruntime*",
    "tests/test_symmetric.py::test_hard_symmetric_mobilenet_folds_into_a_chain",
    "tests/test_symmetric.py::test_penalty_is_zero_exactly_when_symmetric_and_its_gradient_*",
    "tests/test_symmetric.py::test_sgd_steps_with_the_penalty_make_the_kernels_more_symmetric",
    "tests/test_device_check.py::test_device_resident_training_resumes_*",
    "tests/test_train.py::test_half_precision_computes_in_bfloat16_and_keeps_float32_params",
    "tests/test_models.py::test_imagenet_stem_output_and_half_precision",
    "tests/test_models.py::test_hard_symmetry_is_the_unconstrained_net_*[[]mobilenet-*",
    "tests/test_fold.py::test_fold_kernels_gives_a_plain_residual_net_*[[]resnet-*",
    "tests/test_quantize.py::test_identity_apart_changes_nothing_without_an_identity[[]mobilenet-*",
    "tests/test_reproduce.py::test_cli_rejects_unknown_experiment_and_preset",
    "tests/test_main.py::test_an_installed_wheel_runs_a_config_by_name",
)


def pytest_addoption(parser):
    parser.addoption(
        "--grain-workers",
        type=int,
        default=2,
        help="Grain worker processes of the streamed preemption test and of the ImageNet "
        "configs in tests/test_every_config.py (the ImageNet config's own is 32: "
        "--grain-workers=32 runs the preemption test at that, about 5 minutes on 2 cores).",
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(fnmatch.fnmatch(item.nodeid, pattern) for pattern in SLOW):
            item.add_marker(pytest.mark.slow)
