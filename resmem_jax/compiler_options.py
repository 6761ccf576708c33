"""XLA compiler options for the model's jitted steps (train, eval, the embedding pass).

On CPU, jaxlib 0.10's defaults send every convolution's kernel gradient to YNNPACK, which wants
the activations transposed to batch-minor; XLA fuses the batch norm, ReLU and residual chain of
the forward pass into those transposes and recomputes it there, and that cost more than all the
convolutions (BUILD_NOTES.md, "ResNet-20 step on CPU, session 6"). Giving YNNPACK the dots,
elementwise ops and reductions instead, and leaving convolutions to XLA's own kernels, made the
ResNet-20 float32 train step 1.4x faster on the 2-core machine here.

The options go to ``jax.jit(..., compiler_options=...)`` of the steps of the convolutional models
only: the transformer's step ran 5-10% slower with them, and the memory's search keeps XLA's
defaults (the same option made ``exact`` 16-20% slower). They apply where they were measured, CPU
under jaxlib 0.10; elsewhere, for a model of your own (``resmem_jax.fit``), or when ``XLA_FLAGS``
already sets the option (the user's choice wins), XLA's defaults stay.
"""
from __future__ import annotations

import os

import jax
import jaxlib

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
CPU_MODEL_OPTIONS = {
    YNN_FUSION_OPTION: ",".join(f"LIBRARY_FUSION_TYPE_{kind}"
                                for kind in ("INDIVIDUAL_DOT", "ELTWISE", "REDUCE")),
}
CONV_MODELS = ("cnn", "cifar_resnet", "resnet")  # model.name values that take them
MEASURED_JAXLIB = (0, 10)  # major, minor of the jaxlib the CPU options were measured on


def _jaxlib_minor(version: str) -> tuple[int, ...]:
  return tuple(int(part) for part in version.split(".")[:2])


def model_step_options(model_name: str | None, platform: str, *,
                       jaxlib_version: str | None = None,
                       xla_flags: str | None = None) -> dict | None:
  """The ``compiler_options`` for a step of model ``model_name`` (``ModelSettings.name``; None
  for a model of your own) compiled for ``platform`` ('cpu', 'gpu', 'tpu').

  None means XLA's defaults. ``jaxlib_version`` and ``xla_flags`` default to the installed
  jaxlib and the ``XLA_FLAGS`` environment variable.
  """
  if platform != "cpu" or model_name not in CONV_MODELS:
    return None
  version = jaxlib.__version__ if jaxlib_version is None else jaxlib_version
  if _jaxlib_minor(version) != MEASURED_JAXLIB:
    return None
  flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  if YNN_FUSION_OPTION in flags:
    return None
  return dict(CPU_MODEL_OPTIONS)


def for_model(model_name: str | None, mesh: jax.sharding.Mesh) -> dict | None:
  """``model_step_options`` for ``model_name`` on the platform of ``mesh``'s devices."""
  return model_step_options(model_name, mesh.devices.flat[0].platform)
