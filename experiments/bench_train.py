"""Throughput of the training step: CIFAR ResNet-20, batch 128, SGD + momentum.

  python -m experiments.bench_train [--batch_size=128] [--dtypes=float32,bfloat16] [--steps=10]
      [--compiler_options=tuned,xla_default]

Prints images/s, the achieved FLOP/s and its fraction of a large float32 matmul's FLOP/s on the
same machine (the practical hardware limit). FLOPs per step come from XLA's cost analysis of the
compiled step; the analytic count (2 x multiply-adds of convs and dense layers, forward, times 3
for forward + backward) is printed beside it. With a compute dtype other than float32 the
matmul is also timed in that dtype. Step and matmul timings are interleaved and the fastest of
each kept, so load from other processes on a shared machine affects both alike.
"""
from resmem_jax.cli import flags as cli_flags  # first: quiets TensorFlow before it loads

from absl import flags

from resmem_jax import settings
from resmem_jax.bench import train_step

_BATCH = flags.DEFINE_integer("batch_size", 128, "Global batch size.")
_DEPTH = flags.DEFINE_integer("depth", 20, "CIFAR ResNet depth (6n+2).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"],
                            "Compute dtypes to measure, one after the other (float32, bfloat16).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one compile + warm-up step).")
_CONV = flags.DEFINE_enum("conv_impl", "xla", list(settings.CONV_IMPLS),
                          "ResNet convolution implementation.")
_OPTIONS = flags.DEFINE_list(
    "compiler_options", ["tuned", "xla_default"],
    "Compile the step with model.cpu_compiler_options 'tuned' (resmem_jax/compiler_options.py) "
    "and/or 'xla_default', one after the other.")
_MATMUL = flags.DEFINE_integer("matmul_size", 2048, "n for the n x n x n float32 matmul.")


def main(argv):
  del argv
  for dtype in _DTYPES.value:
    for options in _OPTIONS.value:
      result = train_step.benchmark_train_step(
          batch_size=_BATCH.value, depth=_DEPTH.value, dtype=dtype, steps=_STEPS.value,
          matmul_size=_MATMUL.value, conv_impl=_CONV.value, compiler_options=options)
      for key, value in result.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
      print()


if __name__ == "__main__":
  cli_flags.run(main)
