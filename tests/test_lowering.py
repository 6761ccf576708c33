"""The programs the tools run on a device lower for TPU and GPU (``jax.export``) on this CPU.

Issue 22: the train and eval steps of every model family in float32 and bfloat16, parameter
init, the inference (embedding) pass of the image models and the LM's per-token pass, the `exact`
and `approx` search programs, the validation sweep's, the gate's, prediction's and kNN-LM's jitted
pieces, the memory's residual programs and the theory job's solver; the sharded ones also on a
mesh of 8 (fake) devices with the shardings the tools use. A program that cannot run on an
accelerator (a host callback inside a step, say) fails here before a user's first TPU run, and
:func:`test_every_jitted_program_has_a_lowering_test` fails for a new ``jax.jit`` in the package
that no test here lowers. The platform-specific choices (exact's defaults, approx's reduction)
are pinned here too; the CPU compiler options' in tests/test_compiler_options.py.
"""
import ast
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from conftest import REPO_ROOT, run_python
from resmem_jax import fitting
from resmem_jax import inference
from resmem_jax import mesh as mesh_lib
from resmem_jax import models
from resmem_jax import resmem as resmem_lib
from resmem_jax.core import gate
from resmem_jax.core import residuals as residuals_lib
from resmem_jax.core import selection
from resmem_jax.jobs import theory
from resmem_jax.memory import approx
from resmem_jax.memory import exact
from resmem_jax.memory import store as store_lib
from resmem_jax.settings import ModelSettings, TrainSettings
from resmem_jax.training import loop
from resmem_jax.training import optimizer
from resmem_jax.training import state as state_lib
from resmem_jax.training import steps

PLATFORMS = ("tpu", "cuda")
# Each family at a size that lowers in well under a second; (settings, input shape, input dtype).
# A batch of 8 splits over the 8-device mesh.
FAMILIES = {
    "mlp": (dict(name="mlp", width=16, depth=1), (8, 8, 8, 1), "float32"),
    "cnn": (dict(name="cnn", width=4), (8, 8, 8, 1), "float32"),
    "cifar_resnet": (dict(name="cifar_resnet", depth=8, width=0.25), (8, 16, 16, 3), "float32"),
    "resnet": (dict(name="resnet", depth=18, width=0.125), (8, 32, 32, 3), "float32"),
    "transformer": (dict(name="transformer", width=16, depth=1, num_heads=2, max_len=16), (8, 16),
                    "int32"),
}
# The optimizers the configs train with: SGD with momentum and coupled weight decay for the image
# models (the defaults), tiny_shakespeare's clipped AdamW for the LM.
IMAGE_TRAIN = TrainSettings(label_smoothing=0.1)
LM_TRAIN = TrainSettings(optimizer="adamw", learning_rate=3e-3, b2=0.99, weight_decay=0.01,
                         warmup_epochs=0.2, grad_clip_norm=1.0)
VOCABULARY = 65  # tiny_shakespeare's characters: wider than the sparse rows' top_m + 1
LM_TOP_M = 16  # tiny_shakespeare's resmem.top_m


def _with_sharding(tree, sharding):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _abstract(family: str, dtype: str, mesh):
  """(module, tx, abstract train state, abstract batch, train settings) as the tools place them
  on ``mesh``: state replicated, batch split along the data axis. Shapes only, nothing computed."""
  cfg, shape, input_dtype = FAMILIES[family]
  train = LM_TRAIN if family == "transformer" else IMAGE_TRAIN
  num_classes = VOCABULARY if family == "transformer" else 10
  module = models.build_model(ModelSettings(**cfg), num_classes=num_classes, dtype=dtype)
  tx = optimizer.make_optimizer(train, optimizer.make_schedule(train, 10, 100))

  def init():
    variables = module.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                            jnp.zeros(shape, input_dtype), train=False)
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                                batch_stats=variables.get("batch_stats", {}),
                                opt_state=tx.init(variables["params"]))

  rows = shape[:2] if input_dtype == "int32" else shape[:1]  # tokens: a label per position
  split = mesh_lib.batch_sharded(mesh)
  batch = {"inputs": jax.ShapeDtypeStruct(shape, jnp.dtype(input_dtype), sharding=split),
           "labels": jax.ShapeDtypeStruct(rows, jnp.int32, sharding=split),
           "mask": jax.ShapeDtypeStruct(rows, jnp.float32, sharding=split)}
  state = _with_sharding(jax.eval_shape(init), mesh_lib.replicated(mesh))
  return module, tx, state, batch, train


def _export(fn, *args, **kwargs) -> export.Exported:
  exported = export.export(fn, platforms=PLATFORMS)(*args, **kwargs)
  assert exported.platforms == PLATFORMS
  return exported


def _export_steps(family: str, dtype: str, mesh):
  """The train and eval steps jitted as training/loop.py jits them (outputs replicated, the old
  state donated), exported; with the abstract state and batch."""
  module, tx, state, batch, train = _abstract(family, dtype, mesh)
  replicated = mesh_lib.replicated(mesh)
  train_step = steps.make_train_step(module, tx, train.label_smoothing, jax.random.key(1))
  exported_train = _export(jax.jit(train_step, out_shardings=(replicated, replicated),
                                   donate_argnums=0), state, batch)
  exported_eval = _export(jax.jit(steps.make_eval_step(module), out_shardings=replicated),
                          state.variables(), batch)
  return exported_train, exported_eval, (train_step, state, batch)


def _export_init(family: str, mesh):
  """training/state.py's two init programs: ``module.init`` (init_variables) and the optimizer's
  init (init_state), both with replicated outputs."""
  module, tx, state, batch, _ = _abstract(family, "float32", mesh)
  sample = jnp.zeros((1,) + batch["inputs"].shape[1:], batch["inputs"].dtype)
  replicated = mesh_lib.replicated(mesh)

  def init(key):  # as in state_lib.init_variables
    return module.init({"params": key, "dropout": key}, sample, train=False)

  key = jax.eval_shape(lambda: jax.random.fold_in(jax.random.key(0), 0))
  return (_export(jax.jit(init, out_shardings=replicated), key),
          _export(jax.jit(tx.init, out_shardings=replicated), state.params))


def _export_pass(family: str, dtype: str, mesh, **forward_options):
  """inference.make_forward's program for the family's model, as the passes build it."""
  module, _, state, batch, _ = _abstract(family, dtype, mesh)
  forward = inference.make_forward(lambda variables, x: module.apply(variables, x, train=False),
                                   mesh, **forward_options)
  return _export(forward.fn, state.variables(), batch["inputs"], batch["labels"])


# The LM's per-token passes (fitting.py): the memory build's (no logits, the sparse residual rows
# at each candidate temperature) and validation / evaluation's (logits).
LM_PASSES = {"memory": dict(with_logits=False, temperatures=(0.5, 1.0, 2.0),
                            residual_format="sparse", top_m=LM_TOP_M),
             "eval": dict(with_logits=True)}


def _export_searches(mesh, keys_per_device: int):
  """The per-device search programs of the two on-device backends, keys split over ``mesh``."""
  whole = mesh_lib.replicated(mesh)
  queries = jax.ShapeDtypeStruct((128, 10), jnp.float32, sharding=whole)
  num_keys = jax.ShapeDtypeStruct((), jnp.int32, sharding=whole)
  keys = jax.ShapeDtypeStruct((mesh.devices.size * keys_per_device, 10), jnp.float32,
                              sharding=mesh_lib.batch_sharded(mesh))
  # pylint: disable=protected-access
  return {"exact": _export(exact._make_search_fn(mesh, 18, min(1024, keys_per_device),
                                                 keys_per_device, 128), queries, num_keys, keys),
          "approx": _export(approx._make_search_fn(mesh, 18, keys_per_device, 0.95),
                            queries, num_keys, keys)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_and_eval_steps_lower_for_tpu_and_cuda(family, dtype):
  exported_train, exported_eval, (train_step, state, batch) = _export_steps(
      family, dtype, mesh_lib.data_mesh())
  # The lowered step returns the new state and the step's metrics, shaped as on CPU.
  expected = jax.tree.leaves(jax.eval_shape(train_step, state, batch))
  assert [(a.shape, a.dtype) for a in exported_train.out_avals] == [
      (a.shape, a.dtype) for a in expected]
  assert {a.shape for a in exported_eval.out_avals} == {()}  # masked sums


def test_a_host_callback_inside_a_step_fails_to_lower():
  # What these tests exist to catch: a step that calls back to Python cannot be exported.
  module, tx, state, batch, _ = _abstract("mlp", "float32", mesh_lib.data_mesh())
  train_step = steps.make_train_step(module, tx, 0.0, jax.random.key(1))

  def step_with_callback(state, batch):
    new_state, metrics = train_step(state, batch)
    loss = jax.pure_callback(lambda x: x, jax.ShapeDtypeStruct((), jnp.float32), metrics["loss"])
    return new_state, dict(metrics, loss=loss)

  with pytest.raises(Exception, match="(?i)callback|custom call"):
    export.export(jax.jit(step_with_callback), platforms=PLATFORMS)(state, batch)


@pytest.mark.parametrize("family", ["cnn", "transformer"])
def test_parameter_init_lowers_for_tpu_and_cuda(family):
  exported_init, exported_tx_init = _export_init(family, mesh_lib.data_mesh())
  assert exported_init.out_avals and exported_tx_init.out_avals


def test_exact_and_approx_searches_lower_for_tpu_and_cuda():
  for name, exported in _export_searches(mesh_lib.data_mesh(), 4096).items():
    assert [a.shape for a in exported.out_avals] == [(128, 18), (128, 18)], name


@pytest.mark.parametrize("residual_format", ["dense", "sparse"])
def test_the_inference_pass_lowers_for_tpu_and_cuda(residual_format):
  exported = _export_pass("cnn", "float32", mesh_lib.data_mesh(), temperatures=(1.0, 2.0),
                          residual_format=residual_format, top_m=3)
  assert len(exported.out_avals) == 1 + 2 * (2 if residual_format == "sparse" else 1) + 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("which", sorted(LM_PASSES))
def test_the_lm_per_token_pass_lowers_for_tpu_and_cuda(which, dtype):
  exported = _export_pass("transformer", dtype, mesh_lib.data_mesh(), **LM_PASSES[which])
  # A row per token: [sequences, length, ...]; the sparse rows keep the label and top_m columns.
  shapes = sorted((a.shape, str(a.dtype)) for a in exported.out_avals)
  rows = FAMILIES["transformer"][1]
  if which == "memory":
    assert shapes.count((rows + (LM_TOP_M + 1,), "int32")) == 3  # a column set per temperature
  else:
    assert (rows + (VOCABULARY,), "float32") in shapes  # the logits


# Programs of one device (they take host arrays, unsharded): name -> (jitted fn, args, kwargs),
# each at the shapes and dtypes its caller gives it.
Q, K, C, M = 32, 8, VOCABULARY, LM_TOP_M + 1  # queries, neighbours, classes, sparse entries


def _f32(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def _i32(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.int32)


SINGLE_DEVICE_PROGRAMS = {
    # The validation sweep on dense rows (ResMem only) and the base model's own sums.
    "score_chunk": (selection._score_chunk,  # pylint: disable=protected-access
                    (_f32(Q, K), _f32(Q, K, C), None, _f32(Q, C), _i32(Q), _f32(2, Q), None,
                     _f32(), _f32(5), _f32(3), None), dict(k_grid=(1, 4, 8), num_classes=C)),
    "base_1_sums": (selection._base_1_sums, (_f32(Q, C), _i32(Q), _f32(2, Q)), {}),  # pylint: disable=protected-access
    # The gate's second pass (dense rows).
    "gate_score_rows": (gate._score_rows, (_f32(Q, C), _i32(Q), _f32(Q, K), _f32(Q, K, C), None,  # pylint: disable=protected-access
                                           _f32(), _f32(), _f32(), _f32()), {}),
    # Prediction and evaluation (fitting.predict_rows, fitting.evaluate).
    "base_prediction": (fitting._base_prediction, (_f32(Q, C), _f32()), {}),  # pylint: disable=protected-access
    "probabilities": (fitting._probabilities, (_f32(Q, C), _f32(Q, C), _f32()), {}),  # pylint: disable=protected-access
    "row_metrics": (fitting._row_metrics, (_f32(Q, C), _i32(Q)), {}),  # pylint: disable=protected-access
    # fitting.predict_rows's kNN-LM head and ResMem's combination (sparse rows, as the LM stores).
    "knnlm": (fitting._knnlm, (_f32(Q, C), _f32(Q, K), _f32(), _i32(Q, K), _f32()), {}),  # pylint: disable=protected-access
    "combine": (resmem_lib._combine, (_f32(Q, C), _f32(Q, K), _f32(), _f32(Q, K, M),  # pylint: disable=protected-access
                                      _i32(Q, K, M)), {}),
    # The validation sweep scoring ResMem and kNN-LM (lambdas given) on sparse rows.
    "score_chunk_knnlm": (selection._score_chunk,  # pylint: disable=protected-access
                          (_f32(Q, K), _f32(Q, K, M), _i32(Q, K, M), _f32(Q, C), _i32(Q),
                           _f32(2, Q), _i32(Q, K), _f32(), _f32(5), _f32(3), _f32(4)),
                          dict(k_grid=(1, 4, 8), num_classes=C)),
    # The memory's residual programs (memory.build_memory from dense residuals, residuals()).
    "sparse_top_m": (store_lib._sparse_top_m, (_f32(Q, C),), dict(top_m=LM_TOP_M)),  # pylint: disable=protected-access
    "classification_residuals": (residuals_lib._classification_residuals_jit,  # pylint: disable=protected-access
                                 (_i32(Q), _f32(Q, C), _f32()), {}),
    # The theory job's projected gradient descent (d = 8, its largest default dimension).
    "pgd": (theory._pgd, (_f32(8, 8), _f32(8), _f32(), theory.TheoryConfig().pgd_steps), {}),  # pylint: disable=protected-access
}


@pytest.mark.parametrize("name", sorted(SINGLE_DEVICE_PROGRAMS))
def test_single_device_programs_lower_for_tpu_and_cuda(name):
  fn, args, kwargs = SINGLE_DEVICE_PROGRAMS[name]
  exported = _export(fn, *args, **kwargs)
  assert exported.nr_devices == 1 and exported.out_avals


def test_the_divergence_check_lowers_for_tpu_and_cuda():
  # training/loop.py's _all_finite over the replicated train state, after each logged step.
  _, _, state, _, _ = _abstract("cnn", "bfloat16", mesh_lib.data_mesh())
  exported = _export(loop._all_finite, state)  # pylint: disable=protected-access
  assert [(a.shape, a.dtype) for a in exported.out_avals] == [((), jnp.bool_)]


def lower_on_eight_devices() -> list[str]:
  """Every sharded program exported on the 8-device mesh (run by the subprocess below)."""
  mesh = mesh_lib.data_mesh()
  assert mesh.devices.size == 8
  exported = {}
  for family in FAMILIES:
    exported[f"train_step[{family}]"], exported[f"eval_step[{family}]"], _ = _export_steps(
        family, "float32", mesh)
  for family in ("cnn", "transformer"):
    exported[f"init[{family}]"], exported[f"tx_init[{family}]"] = _export_init(family, mesh)
  exported["all_finite"] = _export(loop._all_finite, _abstract("cnn", "float32", mesh)[2])  # pylint: disable=protected-access
  exported["image_pass"] = _export_pass("cnn", "float32", mesh, temperatures=(1.0,),
                                        residual_format="sparse", top_m=3)
  for which, options in LM_PASSES.items():
    exported[f"lm_pass[{which}]"] = _export_pass("transformer", "float32", mesh, **options)
  for name, e in _export_searches(mesh, 512).items():
    assert [a.shape for a in e.out_avals] == [(128, 18)] * 2, name
    exported[f"search[{name}]"] = e
  for name, e in exported.items():
    assert e.nr_devices == 8 and e.platforms == PLATFORMS, name
  return sorted(exported)


def test_sharded_programs_lower_on_a_mesh_of_eight_devices():
  # The shardings the tools use: batches split along the data axis for the steps and the passes,
  # keys split for the searches, parameters and optimizer state replicated. The one-device
  # programs above take host arrays and run on one device whatever the mesh: nothing to shard.
  proc = run_python("import test_lowering; print('LOWERED ON 8:', test_lowering.lower_on_eight_devices())",
                    devices=8, env={"PYTHONPATH": str(REPO_ROOT / "tests")})
  lowered = proc.stdout.split("LOWERED ON 8:")[1].strip()
  expected = ([f"{step}[{family}]" for step in ("train_step", "eval_step") for family in FAMILIES]
              + [f"{init}[{family}]" for init in ("init", "tx_init")
                 for family in ("cnn", "transformer")]
              + ["all_finite", "image_pass", "lm_pass[eval]", "lm_pass[memory]",
                 "search[approx]", "search[exact]"])
  assert lowered == repr(sorted(expected))


# ---------------------------------------------------------------------- platform-specific choices


def test_exact_defaults_by_platform_for_the_lowered_platforms():
  # exact's unset options by the devices' platform: CPU its measured tiles and two calls in
  # flight, every accelerator (jax's names: 'gpu' for CUDA and ROCm, 'tpu') the large blocks.
  assert exact.defaults_for_platform("cpu") == exact.CPU_DEFAULTS
  for platform in ("gpu", "cuda", "rocm", "tpu"):
    assert exact.defaults_for_platform(platform) == exact.ACCELERATOR_DEFAULTS, platform
  assert exact.CPU_DEFAULTS["calls_in_flight"] == 2
  assert exact.ACCELERATOR_DEFAULTS["calls_in_flight"] == 1
  # The index built here takes the CPU's; an option given wins over either.
  index = exact.ExactIndex(np.zeros((4, 3), np.float32), query_tile=64)
  assert (index.query_tile, index.calls_in_flight) == (64, exact.CPU_DEFAULTS["calls_in_flight"])


def test_approx_lowers_to_tpu_native_top_k_and_an_exact_fallback_elsewhere():
  # approx_min_k lowers to XLA's ApproxTopK on every platform; off TPU it is marked is_fallback,
  # which XLA compiles to an exact sort (so approx equals exact on CPU and GPU:
  # tests/test_memory_approx.py checks the ids on CPU).
  mesh = mesh_lib.data_mesh()
  fn = approx._make_search_fn(mesh, 18, 4096, 0.95)  # pylint: disable=protected-access
  args = (_f32(128, 10), _i32(), _f32(4096, 10))

  def approx_top_k_calls(platform):
    module = export.export(fn, platforms=(platform,))(*args).mlir_module()
    return [line for line in module.splitlines() if "custom_call @ApproxTopK" in line]

  (tpu,), (cuda,) = approx_top_k_calls("tpu"), approx_top_k_calls("cuda")
  assert "is_fallback" not in tpu and "recall_target = 0.949" in tpu
  assert "is_fallback = true" in cuda
  compiled = fn.lower(*args).compile().as_text()  # on this CPU: a sort, no ApproxTopK left
  assert "ApproxTopK" not in compiled and re.search(r"\bsort\(", compiled)


# ------------------------------------------------------------------- every jit site has a test

PACKAGE = REPO_ROOT / "resmem_jax"
# The slow tests that export the programs with the arguments a real fit gives them.
RECORDED_FIT = "test_the_selection_gate_and_prediction_programs_lower_for_tpu_and_cuda"
RECORDED_LM_FIT = "test_the_lm_and_knnlm_programs_of_a_real_fit_lower_for_tpu_and_cuda"
# Every jax.jit in the package ("file:function", the decorated or enclosing function, or the
# module-level name it is assigned to) -> the tests here that lower it (the first of each in the
# default run).
LOWERED_BY = {
    "core/gate.py:_score_rows": [
        "test_single_device_programs_lower_for_tpu_and_cuda[gate_score_rows]", RECORDED_FIT],
    "core/residuals.py:_classification_residuals_jit": [
        "test_single_device_programs_lower_for_tpu_and_cuda[classification_residuals]"],
    "core/selection.py:_score_chunk": [
        "test_single_device_programs_lower_for_tpu_and_cuda[score_chunk]",
        "test_single_device_programs_lower_for_tpu_and_cuda[score_chunk_knnlm]", RECORDED_FIT,
        RECORDED_LM_FIT],
    "core/selection.py:_base_1_sums": [
        "test_single_device_programs_lower_for_tpu_and_cuda[base_1_sums]", RECORDED_FIT],
    "fitting.py:_base_prediction": [
        "test_single_device_programs_lower_for_tpu_and_cuda[base_prediction]", RECORDED_FIT],
    "fitting.py:_probabilities": [
        "test_single_device_programs_lower_for_tpu_and_cuda[probabilities]", RECORDED_FIT],
    "fitting.py:_row_metrics": [
        "test_single_device_programs_lower_for_tpu_and_cuda[row_metrics]", RECORDED_FIT],
    "fitting.py:_knnlm": ["test_single_device_programs_lower_for_tpu_and_cuda[knnlm]",
                          RECORDED_LM_FIT],
    "inference.py:make_forward.forward": [
        "test_the_inference_pass_lowers_for_tpu_and_cuda",
        "test_the_lm_per_token_pass_lowers_for_tpu_and_cuda",
        "test_sharded_programs_lower_on_a_mesh_of_eight_devices", RECORDED_LM_FIT],
    "jobs/theory.py:_pgd": ["test_single_device_programs_lower_for_tpu_and_cuda[pgd]"],
    "memory/approx.py:_make_search_fn.search": [
        "test_exact_and_approx_searches_lower_for_tpu_and_cuda",
        "test_sharded_programs_lower_on_a_mesh_of_eight_devices"],
    "memory/exact.py:_make_search_fn.search": [
        "test_exact_and_approx_searches_lower_for_tpu_and_cuda",
        "test_sharded_programs_lower_on_a_mesh_of_eight_devices"],
    "memory/store.py:_sparse_top_m": ["test_single_device_programs_lower_for_tpu_and_cuda[sparse_top_m]"],
    "resmem.py:_combine": ["test_single_device_programs_lower_for_tpu_and_cuda[combine]",
                           RECORDED_FIT, RECORDED_LM_FIT],
    "training/loop.py:_all_finite": ["test_the_divergence_check_lowers_for_tpu_and_cuda",
                                     "test_sharded_programs_lower_on_a_mesh_of_eight_devices"],
    # The train and eval steps, jitted with the same out_shardings and donation by _export_steps.
    "training/loop.py:train_and_evaluate": ["test_train_and_eval_steps_lower_for_tpu_and_cuda",
                                            "test_sharded_programs_lower_on_a_mesh_of_eight_devices"],
    "training/state.py:init_variables": ["test_parameter_init_lowers_for_tpu_and_cuda",
                                         "test_sharded_programs_lower_on_a_mesh_of_eight_devices"],
    "training/state.py:init_state": ["test_parameter_init_lowers_for_tpu_and_cuda",
                                     "test_sharded_programs_lower_on_a_mesh_of_eight_devices"],
    # The accelerator bench's train step: make_train_step jitted as training/loop.py jits it.
    "bench/accelerator.py:time_train_step": [
        "test_train_and_eval_steps_lower_for_tpu_and_cuda",
        "test_sharded_programs_lower_on_a_mesh_of_eight_devices"],
}
# jax.jit sites that are not programs the tools run on a device, and why.
NOT_DEVICE_PROGRAMS = {
    "bench/train_step.py:benchmark_train_step": "a CPU benchmark: it times the CIFAR ResNet's train "
                                                "step (lowered by test_train_and_eval_steps_...) and "
                                                "a plain matmul for the peak FLOP/s",
    "bench/accelerator.py:measure_matmul_tflops": "a probe of the device's peak: one jnp.matmul, "
                                                  "no program of ours",
    "bench/accelerator.py:measure_read_gbps": "a probe of the device's bandwidth: one jnp.sum, no "
                                              "program of ours",
    "bench/memory_scale.py:write_data": "the benchmark's synthetic rows, made on the host's CPU: "
                                        "core/residuals.py's sparse_top_m, lowered as "
                                        "store.py's _sparse_top_m",
}


def _jit_sites(package: pathlib.Path = PACKAGE) -> dict[str, list[int]]:
  """"file:function" -> the lines of each ``jax.jit`` / ``jax.pmap`` in ``package`` (code only,
  not docstrings or comments); a ``jit`` imported from jax by name is a site of its own."""
  sites: dict[str, list[int]] = {}
  for path in sorted(package.rglob("*.py")):
    rel = path.relative_to(package).as_posix()

    def visit(node, scope, assigned=None, rel=rel):
      if isinstance(node, ast.Attribute) and node.attr in ("jit", "pmap") and \
          isinstance(node.value, ast.Name) and node.value.id == "jax":
        sites.setdefault(f"{rel}:{'.'.join(scope) or assigned}", []).append(node.lineno)
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jax") and \
          {a.name for a in node.names} & {"jit", "pmap", "pjit"}:
        sites.setdefault(f"{rel}:<a jit imported by name>", []).append(node.lineno)
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        for child in node.decorator_list + node.body:  # a decorator belongs to its function
          visit(child, scope + [node.name])
        return
      if not scope and isinstance(node, ast.Assign):
        assigned = ",".join(t.id for t in node.targets if isinstance(t, ast.Name))
      for child in ast.iter_child_nodes(node):
        visit(child, scope, assigned)

    visit(ast.parse(path.read_text(), str(path)), [])
  return sites


def test_every_jitted_program_has_a_lowering_test():
  sites = _jit_sites()
  missing = [f"{site} (line {', '.join(map(str, lines))})" for site, lines in sorted(sites.items())
             if site not in LOWERED_BY and site not in NOT_DEVICE_PROGRAMS]
  assert not missing, (
      "jax.jit without a lowering test: " + "; ".join(missing) + ". Export it for "
      "platforms=('tpu', 'cuda') in tests/test_lowering.py (and on the 8-device mesh if its "
      "inputs are sharded) and add it to LOWERED_BY, or to NOT_DEVICE_PROGRAMS with the reason")
  stale = sorted((set(LOWERED_BY) | set(NOT_DEVICE_PROGRAMS)) - set(sites))
  assert not stale, f"LOWERED_BY / NOT_DEVICE_PROGRAMS name jit sites that are gone: {stale}"
  # The table names real tests (and real parameters of the one-device programs' test), and
  # each site is lowered in the default run, not only under -m slow.
  def is_slow(name):
    return any(mark.name == "slow" for mark in getattr(globals()[name], "pytestmark", []))

  for site, tests in LOWERED_BY.items():
    names = []
    for test in tests:
      name, _, param = test.partition("[")
      assert callable(globals().get(name)) and "lower" in name, (site, test)
      assert not param or param.rstrip("]") in SINGLE_DEVICE_PROGRAMS, (site, test)
      names.append(name)
    assert not all(map(is_slow, names)), f"{site}: lowered only by slow tests"


def test_the_jit_site_scan_behind_the_lowering_table(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "new.py").write_text('''"""Mentions jax.jit in a docstring: not a site."""
import functools
import jax
from jax import jit

# jax.jit in a comment: not a site
_square = jax.jit(lambda x: x * x)


@functools.partial(jax.jit, static_argnums=1)
def power(x, n):
  return x ** n


def make(mesh):
  @jax.jit
  def inner(x):
    return x
  step = jax.pmap(inner)
  return step
''')
  assert _jit_sites(tmp_path) == {"sub/new.py:<a jit imported by name>": [4],
                                  "sub/new.py:_square": [7], "sub/new.py:power": [10],
                                  "sub/new.py:make.inner": [16], "sub/new.py:make": [19]}


# ---------------------------------------------------------- programs recorded from a real fit


def _record(monkeypatch, targets) -> dict:
  """Wraps each (module, name) so that its first call's (function, args, kwargs) is kept."""
  recorded = {}

  def recording(name, original):
    def wrapper(*args, **kwargs):
      recorded.setdefault(name, (original, args, kwargs))
      return original(*args, **kwargs)
    return wrapper

  for module, name in targets:
    monkeypatch.setattr(module, name, recording(name, getattr(module, name)))
  return recorded


@pytest.mark.slow  # a real fit and evaluate first: about 10 s
def test_the_selection_gate_and_prediction_programs_lower_for_tpu_and_cuda(monkeypatch):
  # The jitted pieces of the validation sweep, the gate's second pass and prediction, each
  # exported with the arguments a real (tiny) fit and evaluate give it.
  import flax.linen as nn
  import resmem_jax

  recorded = _record(monkeypatch, ((selection, "_score_chunk"), (selection, "_base_1_sums"),
                                   (gate, "_score_rows"), (fitting, "_base_prediction"),
                                   (fitting, "_probabilities"), (fitting, "_row_metrics"),
                                   (resmem_lib, "_combine")))

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      hidden = nn.relu(nn.Dense(8)(x))
      return nn.Dense(3)(hidden), hidden

  rng = np.random.default_rng(0)
  x = rng.normal(size=(240, 5)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)
  model = Net()
  fitted = resmem_jax.fit(model, model.init(jax.random.key(0), x[:1]), train=(x[:120], y[:120]),
                          validation=(x[120:200], y[120:200]), gate_alpha=0.05, progress=False)
  fitted.evaluate(x[200:], y[200:])
  assert len(recorded) == 7, sorted(recorded)
  for name, (fn, args, kwargs) in recorded.items():
    assert _export(fn, *args, **kwargs).platforms == PLATFORMS, name


@pytest.mark.slow  # a real LM fit and evaluate first: about 10 s
def test_the_lm_and_knnlm_programs_of_a_real_fit_lower_for_tpu_and_cuda(monkeypatch):
  # A tiny token model through resmem_jax.fit as tiny_shakespeare configures the memory (sparse
  # top-m rows, kNN-LM beside ResMem): its per-token passes, the kNN-LM sweep and prediction,
  # exported with the arguments (real arrays, real shardings) the fit and evaluate give them.
  import resmem_jax

  recorded = _record(monkeypatch, ((selection, "_score_chunk"), (fitting, "_knnlm"),
                                   (resmem_lib, "_combine")))
  passes = []
  original_call = inference.Forward.__call__

  def call(self, variables, inputs, labels):
    if len(passes) < 2 and all(p[0] is not self.fn for p in passes):
      passes.append((self.fn, (variables, inputs, labels)))
    return original_call(self, variables, inputs, labels)

  monkeypatch.setattr(inference.Forward, "__call__", call)
  module = models.build_model(ModelSettings(**FAMILIES["transformer"][0]), num_classes=11)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 11, size=(40, 8)).astype(np.int32)
  labels = np.roll(tokens, -1, axis=1)  # the next token
  fitted = resmem_jax.fit(module, module.init(jax.random.key(0), tokens[:1], train=False),
                          train=(tokens[:20], labels[:20]),
                          validation=(tokens[20:32], labels[20:32]), knnlm=True,
                          residual_format="sparse", top_m=4, k_grid=(1, 4), progress=False)
  fitted.evaluate(tokens[32:], labels[32:])
  assert sorted(recorded) == ["_combine", "_knnlm", "_score_chunk"]
  assert recorded["_score_chunk"][1][10] is not None  # lambdas: the kNN-LM form
  assert len(passes) == 2  # the memory build's pass and the validation / evaluation pass
  for fn, args in passes:
    assert args[1].dtype == np.int32 and args[1].shape[1:] == (8,)  # token sequences
    _export(fn, *args)
  for fn, args, kwargs in recorded.values():
    _export(fn, *args, **kwargs)
