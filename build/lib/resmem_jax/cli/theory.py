r"""The paper's stylized linear regression: test risk of a norm-constrained linear base vs ResMem.

Sweeps n over a geometric grid, several seeds per n, for each input dimension d, and writes
``WORKDIR/results.json`` (risk mean/std/min/max per model, d, n; fitted log-log slopes) and
``WORKDIR/risk_vs_n.png`` (one log-log panel per d). See resmem_jax/jobs/theory.py for the setting.

  resmem-jax-theory --workdir=/tmp/theory
  resmem-jax-theory --workdir=/tmp/theory --dims=1,2 --ns=64,256,1024 --seeds=2
"""
from resmem_jax.cli import flags as cli_flags  # first: quiets TensorFlow before it loads

import logging

from absl import flags

from resmem_jax.jobs import theory

_DEFAULTS = theory.TheoryConfig()

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory for results.json and the plot.",
                               required=True)
_DIMS = flags.DEFINE_list("dims", [str(d) for d in _DEFAULTS.dims], "Input dimensions d.")
_NS = flags.DEFINE_list("ns", [str(n) for n in _DEFAULTS.ns],
                        "Training set sizes (increasing; a geometric grid gives even log spacing).")
_SEEDS = flags.DEFINE_integer("seeds", _DEFAULTS.seeds, "Independent draws per (d, n).")
_TEST_SIZE = flags.DEFINE_integer("test_size", _DEFAULTS.test_size, "Fresh test points per draw.")
_DOMAIN = flags.DEFINE_enum("domain", _DEFAULTS.domain, list(theory.DOMAINS),
                            "Input distribution: uniform on [-1,1]^d or on the unit sphere.")
_NOISE_STD = flags.DEFINE_float("noise_std", _DEFAULTS.noise_std,
                                "Std of the Gaussian label noise (0 allowed).")
_THETA_NORM = flags.DEFINE_float("theta_norm", _DEFAULTS.theta_norm, "||theta*|| of the target.")
_BASE_NORM = flags.DEFINE_float("base_norm", _DEFAULTS.base_norm,
                                "Norm bound L of the base model (below theta_norm: low capacity).")
_K_RULE = flags.DEFINE_string("k_rule", _DEFAULTS.k_rule,
                              "'grow' (k = ceil(k_scale * n^(2/(2+d)))) or a fixed integer k.")
_K_SCALE = flags.DEFINE_float("k_scale", _DEFAULTS.k_scale, "Constant in the 'grow' rule.")
_SIGMA = flags.DEFINE_float("sigma", None,
                            "Softmax(-distance/sigma) neighbour weights; unset: uniform weights.")
_INCLUDE_K1 = flags.DEFINE_bool("include_k1", _DEFAULTS.include_k1,
                                "Also report k=1 ResMem and 1-NN regression.")
_RISK_TARGET = flags.DEFINE_enum("risk_target", _DEFAULTS.risk_target, list(theory.RISK_TARGETS),
                                 "Test MSE against the noiseless target or the noisy labels.")
_SLOPE_MIN_N = flags.DEFINE_integer("slope_min_n", None,
                                    "Fit slopes on n >= this (default: larger half of the grid).")
_PGD_STEPS = flags.DEFINE_integer("pgd_steps", _DEFAULTS.pgd_steps,
                                  "Projected gradient descent steps for the base model.")
_BACKEND = flags.DEFINE_string("backend", _DEFAULTS.backend, "Memory backend for the k-NN search.")


def _ints(values, name):
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise ValueError(f"--{name} must be a comma-separated list of integers, got {values!r}") from None


def main(argv):
  del argv
  config = theory.TheoryConfig(
      dims=_ints(_DIMS.value, "dims"), ns=_ints(_NS.value, "ns"), seeds=_SEEDS.value,
      test_size=_TEST_SIZE.value, domain=_DOMAIN.value, noise_std=_NOISE_STD.value,
      theta_norm=_THETA_NORM.value, base_norm=_BASE_NORM.value, k_rule=_K_RULE.value,
      k_scale=_K_SCALE.value, sigma=_SIGMA.value, include_k1=_INCLUDE_K1.value,
      risk_target=_RISK_TARGET.value, slope_min_n=_SLOPE_MIN_N.value,
      pgd_steps=_PGD_STEPS.value, backend=_BACKEND.value)
  results = theory.run_experiment(config, _WORKDIR.value, log=logging.getLogger(cli_flags.PHASE_LOGGER).info)
  for model, by_d in results["slopes"].items():
    print(f"slope {model:14s} " + "  ".join(
        f"d={d}: " + ("n/a (zero risk)" if s is None else f"{s:+.3f}") for d, s in by_d.items()))
  print("theory k-NN rate     " + "  ".join(
      f"d={d}: {s:+.3f}" for d, s in results["theory_slopes"].items()))
  print(f"wrote {_WORKDIR.value}/results.json and {_WORKDIR.value}/{results['plot']}")


def run():
  cli_flags.run(main)


if __name__ == "__main__":
  run()
