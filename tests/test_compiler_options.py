"""The CPU compiler options of the convolutional models' steps: where they apply, and that a
step compiled with them computes what XLA's defaults compute."""
import warnings

import jax
import numpy as np
import pytest

from resmem_jax import compiler_options
from resmem_jax import mesh as mesh_lib
from resmem_jax import models
from resmem_jax.settings import ModelSettings, TrainSettings
from resmem_jax.training import optimizer
from resmem_jax.training import provenance
from resmem_jax.training import state as state_lib
from resmem_jax.training import steps


def test_options_only_for_convolutional_models_on_cpu_under_the_measured_jaxlib():
  options = compiler_options.model_step_options("cifar_resnet", "cpu", jaxlib_version="0.10.2",
                                                xla_flags="")
  assert options == compiler_options.CPU_MODEL_OPTIONS
  for name in compiler_options.CONV_MODELS:
    assert compiler_options.model_step_options(name, "cpu", jaxlib_version="0.10.0",
                                               xla_flags="") == options
  # XLA's defaults: other platforms, models without convolutions, a user's own model, other
  # jaxlib versions (unmeasured; an option XLA no longer knows would fail the compile).
  assert compiler_options.model_step_options("resnet", "gpu", jaxlib_version="0.10.2",
                                             xla_flags="") is None
  assert compiler_options.model_step_options("transformer", "cpu", jaxlib_version="0.10.2",
                                             xla_flags="") is None
  assert compiler_options.model_step_options(None, "cpu", jaxlib_version="0.10.2",
                                             xla_flags="") is None
  with pytest.warns(compiler_options.UnmeasuredJaxlibWarning):
    assert compiler_options.model_step_options("cnn", "cpu", jaxlib_version="0.11.0",
                                               xla_flags="") is None
  # The user's own XLA_FLAGS setting of the option wins.
  flags = f"--{compiler_options.YNN_FUSION_OPTION}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
  assert compiler_options.model_step_options("cnn", "cpu", jaxlib_version="0.10.2",
                                             xla_flags=flags) is None


def test_tuned_options_under_another_jaxlib_warn_once_and_are_skipped():
  # "tuned" asked for on CPU, but the installed jaxlib is not the one they were measured on:
  # XLA's defaults, said once in one line (Python's default filter: once per calling line).
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("default")
    for _ in range(3):
      assert compiler_options.model_step_options("cifar_resnet", "cpu", jaxlib_version="0.11.0",
                                                 xla_flags="") is None
  assert [w.category for w in caught] == [compiler_options.UnmeasuredJaxlibWarning]
  message = str(caught[0].message)
  assert "\n" not in message and "cpu_compiler_options='tuned' skipped" in message
  assert "jaxlib 0.10.x, not 0.11.0" in message
  # Nothing to say where they were never meant to apply, or where they apply.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert compiler_options.model_step_options("cnn", "gpu", jaxlib_version="0.11.0",
                                               xla_flags="") is None
    assert compiler_options.model_step_options("transformer", "cpu", jaxlib_version="0.11.0",
                                               xla_flags="") is None
    assert compiler_options.model_step_options("cnn", "cpu", jaxlib_version="0.10.0",
                                               xla_flags="") is not None


@pytest.mark.slow
def test_tuned_resnet_step_computes_what_the_default_step_computes():
  mesh = mesh_lib.data_mesh()
  options = compiler_options.for_model(
      ModelSettings(name="cifar_resnet", cpu_compiler_options="tuned"), mesh)
  assert compiler_options.for_model(ModelSettings(name="cifar_resnet"), mesh) is None  # default
  assert compiler_options.for_model(None, mesh) is None  # a model of your own
  if options is None:
    pytest.skip(f"no compiler options on this platform / jaxlib {jax.__version__}")
  module = models.build_model(ModelSettings(name="cifar_resnet", depth=8, width=0.5), 10)
  train = TrainSettings(learning_rate=0.1, momentum=0.9, weight_decay=1e-4)
  tx = optimizer.make_optimizer(train, optimizer.make_schedule(train, 10, 100))
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
           "labels": rng.integers(0, 10, 16).astype(np.int32)}
  state = state_lib.init_state(module, tx, batch["inputs"][:1], 0, mesh)
  batch = mesh_lib.shard_batch(batch, mesh)
  results = []
  for opts in (None, options):
    step = jax.jit(steps.make_train_step(module, tx, 0.0, jax.random.key(0)),
                   compiler_options=opts)
    compiled = step.lower(state, batch).compile()
    results.append(jax.device_get(compiled(state, batch)))
  (default_state, default_metrics), (tuned_state, tuned_metrics) = results
  np.testing.assert_allclose(tuned_metrics["loss"], default_metrics["loss"], rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         tuned_state.params, default_state.params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         tuned_state.batch_stats, default_state.batch_stats)


def test_a_run_recorded_before_the_field_existed_reads_as_xla_defaults():
  before_session_6 = {"model.name": "cnn"}
  current = {"model.name": "cnn", "model.cpu_compiler_options": "xla_default"}
  assert provenance.differences(before_session_6, current) == []  # reruns as before
  assert provenance.differences(before_session_6, {**current, "model.cpu_compiler_options": "tuned"}
                                ) == ["model.cpu_compiler_options: 'xla_default' -> 'tuned'"]
