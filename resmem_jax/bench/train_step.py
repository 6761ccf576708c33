"""Throughput of the training step (behind ``experiments/bench_train.py``; tests never time).

``benchmark_train_step`` times the CIFAR ResNet's jitted train step and compares its FLOP/s
with a large matmul's on the same device(s), the practical hardware limit.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from resmem_jax import compiler_options as compiler_options_lib
from resmem_jax import mesh as mesh_lib
from resmem_jax import models
from resmem_jax.settings import CPU_COMPILER_OPTIONS, ModelSettings, TrainSettings
from resmem_jax.training import optimizer
from resmem_jax.training import state as state_lib
from resmem_jax.training import steps as steps_lib


def forward_matmul_flops(fn: Callable, *args) -> int:
  """Analytic FLOPs (2 x multiply-adds) of the convolutions and dot products in ``fn(*args)``.

  Walks the jaxpr, so it counts exactly the contractions the model performs (elementwise ops,
  batch norm and pooling, a few percent for ResNets, are left out).
  """
  def walk(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == "conv_general_dilated":
        out = eqn.outvars[0].aval.shape
        rhs = eqn.invars[1].aval.shape
        dims = eqn.params["dimension_numbers"]
        out_feature_dim = dims.rhs_spec[0]
        per_output = int(np.prod(rhs)) // rhs[out_feature_dim]  # kh * kw * in_channels/groups
        total += 2 * int(np.prod(out)) * per_output
      elif name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        contracted = int(np.prod([lhs[d] for d in lhs_contract]))
        total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * contracted
      for sub in jax.core.jaxprs_in_params(eqn.params):
        total += walk(sub)
    return total
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def benchmark_train_step(batch_size: int = 128, depth: int = 20, dtype: str = "float32",
                         steps: int = 10, matmul_size: int = 2048,
                         conv_impl: str = "xla", compiler_options: str = "tuned") -> dict:
  """Images/s and FLOP/s of the CIFAR ResNet training step on the default device(s).

  ``compiler_options``: ``model.cpu_compiler_options``, "tuned" or "xla_default"
  (``resmem_jax/compiler_options.py``).
  """
  if compiler_options not in CPU_COMPILER_OPTIONS:
    raise ValueError(f"compiler_options must be one of {CPU_COMPILER_OPTIONS}, got "
                     f"{compiler_options!r}")
  model = ModelSettings(name="cifar_resnet", depth=depth, width=1.0, conv_impl=conv_impl)
  module = models.build_model(model, 10, dtype=dtype)
  mesh = mesh_lib.data_mesh()
  train = TrainSettings(learning_rate=0.1, momentum=0.9, weight_decay=1e-4, schedule="cosine")
  tx = optimizer.make_optimizer(train, optimizer.make_schedule(train, 100, 10_000))
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32),
           "labels": rng.integers(0, 10, batch_size).astype(np.int32)}
  state = state_lib.init_state(module, tx, batch["inputs"][:1], 0, mesh)
  batch = mesh_lib.shard_batch(batch, mesh)
  replicated = mesh_lib.replicated(mesh)
  options = compiler_options_lib.for_model(
      dataclasses.replace(model, cpu_compiler_options=compiler_options), mesh)
  step = jax.jit(steps_lib.make_train_step(module, tx, 0.0, jax.random.key(0)),
                 out_shardings=(replicated, replicated), donate_argnums=0,
                 compiler_options=options)
  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # None where the backend gives no cost analysis: the FLOPs are unknown, as without "flops".
  xla_flops = float((cost or {}).get("flops", float("nan")))
  # Model FLOPs, counted on the native-conv form so they do not depend on conv_impl.
  reference = models.build_model(dataclasses.replace(model, conv_impl="xla"), 10)
  forward = forward_matmul_flops(
      lambda v, x: reference.apply(v, x, train=False), state.variables(), batch["inputs"])
  analytic_flops = 3.0 * forward  # backward = grad wrt activations + grad wrt weights

  # The hardware limit: a large float32 matmul, and one in the compute dtype when that differs.
  matmul_dtypes = ["float32"] + ([dtype] if dtype != "float32" else [])
  operands = {d: (jax.random.normal(jax.random.key(0), (matmul_size,) * 2, models.compute_dtype(d)),
                  jax.random.normal(jax.random.key(1), (matmul_size,) * 2, models.compute_dtype(d)))
              for d in matmul_dtypes}
  matmul = jax.jit(jnp.matmul)
  for a, b in operands.values():
    jax.block_until_ready(matmul(a, b))
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  # Step and matmul timings are interleaved so both see the same load from other processes;
  # the fastest of each is kept, since other processes only ever add time.
  step_times: list[float] = []
  matmul_times: dict[str, list[float]] = {d: [] for d in matmul_dtypes}
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    step_times.append(time.perf_counter() - start)
    for d, (a, b) in operands.items():
      for _ in range(2):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        matmul_times[d].append(time.perf_counter() - start)
  seconds = float(np.min(step_times))
  peaks = {d: 2.0 * matmul_size ** 3 / float(np.min(t)) for d, t in matmul_times.items()}
  peak = peaks["float32"]
  return {
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "model": f"cifar_resnet{depth}", "batch_size": batch_size, "dtype": dtype,
      "conv_impl": module.conv_impl, "compiler_options": f"{compiler_options} {options or ''}",
      "step_ms": 1e3 * seconds, "images_per_s": batch_size / seconds,
      "xla_flops_per_step": xla_flops, "analytic_flops_per_step": analytic_flops,
      "achieved_tflops_xla": xla_flops / seconds / 1e12,
      "achieved_tflops_analytic": analytic_flops / seconds / 1e12,
      "matmul_tflops": peak / 1e12,
      "fraction_of_matmul_xla": xla_flops / seconds / peak,
      "fraction_of_matmul_analytic": analytic_flops / seconds / peak,
      **{f"{d}_matmul_tflops": p / 1e12 for d, p in peaks.items() if d != "float32"},
      **{f"fraction_of_{d}_matmul_xla": xla_flops / seconds / p
         for d, p in peaks.items() if d != "float32"},
  }
