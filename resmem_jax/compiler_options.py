"""XLA compiler options for the model's jitted steps (train, eval, the embedding pass).

On CPU, jaxlib 0.10's defaults send every convolution's kernel gradient to YNNPACK, which wants
the activations transposed to batch-minor; XLA fuses the batch norm, ReLU and residual chain of
the forward pass into those transposes and recomputes it there, and for ResNet-20 that cost more
than all the convolutions (BUILD_NOTES.md, "ResNet-20 step on CPU, session 6"). Giving YNNPACK
the dots, elementwise ops and reductions instead, and leaving convolutions to XLA's own kernels,
made the ResNet-20 float32 train step 1.2-1.4x faster on the 2-core machine here, but the steps
of small ResNets (width 0.25-0.5 on MNIST, 5-20k parameters) 6-33% slower.

So they are opt-in: ``model.cpu_compiler_options="tuned"`` (default "xla_default", which also
keeps every earlier run reproducible: float rounding differs, so trained models do too). They go
to ``jax.jit(..., compiler_options=...)`` of the steps of the convolutional models only: the
memory's search keeps XLA's defaults (the same option in ``XLA_FLAGS`` made ``exact`` 16-20%
slower). They apply only where they were measured, CPU under jaxlib 0.10 (an option a later XLA
drops would fail the compile), and not when ``XLA_FLAGS`` sets the option itself (the user's
choice wins). Under another jaxlib they are skipped with one :class:`UnmeasuredJaxlibWarning`
(Python shows it once per process), so "tuned" never quietly means XLA's defaults.
"""
from __future__ import annotations

import os
import warnings

import jax
import jaxlib

from resmem_jax.settings import ModelSettings

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
CPU_MODEL_OPTIONS = {
    YNN_FUSION_OPTION: ",".join(f"LIBRARY_FUSION_TYPE_{kind}"
                                for kind in ("INDIVIDUAL_DOT", "ELTWISE", "REDUCE")),
}
CONV_MODELS = ("cnn", "cifar_resnet", "resnet")  # model.name values that take them
MEASURED_JAXLIB = (0, 10)  # major, minor of the jaxlib the CPU options were measured on


class UnmeasuredJaxlibWarning(UserWarning):
  """``model.cpu_compiler_options="tuned"`` on CPU under a jaxlib they were not measured on."""


def _jaxlib_minor(version: str) -> tuple[int, ...]:
  return tuple(int(part) for part in version.split(".")[:2])


def model_step_options(model_name: str | None, platform: str, *,
                       jaxlib_version: str | None = None,
                       xla_flags: str | None = None) -> dict | None:
  """The ``compiler_options`` for a step of model ``model_name`` (``ModelSettings.name``; None
  for a model of your own) compiled for ``platform`` ('cpu', 'gpu', 'tpu').

  None means XLA's defaults. ``jaxlib_version`` and ``xla_flags`` default to the installed
  jaxlib and the ``XLA_FLAGS`` environment variable. A CPU conv model under another jaxlib than
  :data:`MEASURED_JAXLIB` warns (:class:`UnmeasuredJaxlibWarning`) and gets None.
  """
  if platform != "cpu" or model_name not in CONV_MODELS:
    return None
  version = jaxlib.__version__ if jaxlib_version is None else jaxlib_version
  if _jaxlib_minor(version) != MEASURED_JAXLIB:
    measured = ".".join(map(str, MEASURED_JAXLIB))
    # stacklevel 2: the caller's line, so Python's default filter shows it once per process.
    warnings.warn(f"model.cpu_compiler_options='tuned' skipped: measured under jaxlib "
                  f"{measured}.x, not {version} (an option its XLA dropped would fail the "
                  "compile); the steps use XLA's defaults", UnmeasuredJaxlibWarning, stacklevel=2)
    return None
  flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  if YNN_FUSION_OPTION in flags:
    return None
  return dict(CPU_MODEL_OPTIONS)


def for_model(model: ModelSettings | None, mesh: jax.sharding.Mesh) -> dict | None:
  """The options for ``model``'s steps (None: a model of your own) on ``mesh``'s platform."""
  if model is None or model.cpu_compiler_options != "tuned":
    return None
  return model_step_options(model.name, mesh.devices.flat[0].platform)
