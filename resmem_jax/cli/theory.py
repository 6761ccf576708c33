r"""The paper's stylized linear regression: test risk of a norm-constrained linear base vs ResMem.

Sweeps n over a geometric grid, several seeds per n, for each input dimension d, and writes
``WORKDIR/results.json`` (risk mean/std/min/max per model, d, n; log-log slopes of risk against n
with 95% intervals over seeds, over the whole grid, its upper half and consecutive pairs of n; the
rates theory gives) and ``WORKDIR/risk_vs_n.png`` (one log-log panel per d), and prints the slopes
beside the rates. See resmem_jax/jobs/theory.py for the setting and the derivation of the rates.

  resmem-jax-theory --workdir=/tmp/theory
  resmem-jax-theory --workdir=/tmp/theory_noiseless --noise_std=0
  resmem-jax-theory --workdir=/tmp/theory_linear --k_rule=linear_residual
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
_K_RULE = flags.DEFINE_string(
    "k_rule", _DEFAULTS.k_rule, "'grow' (k = ceil(k_scale * n^(2/(2+d))), tuned for a Lipschitz "
    "target), 'linear_residual' (k = ceil(k_scale * n^(3/(3+d))), tuned for a linear residual on "
    "the cube) or a fixed integer k.")
_K_SCALE = flags.DEFINE_float("k_scale", _DEFAULTS.k_scale,
                              "Constant in the 'grow' and 'linear_residual' rules.")
_SIGMA = flags.DEFINE_float("sigma", None,
                            "Softmax(-distance/sigma) neighbour weights; unset: uniform weights.")
_INCLUDE_K1 = flags.DEFINE_bool("include_k1", _DEFAULTS.include_k1,
                                "Also report k=1 ResMem and 1-NN regression.")
_RISK_TARGET = flags.DEFINE_enum("risk_target", _DEFAULTS.risk_target, list(theory.RISK_TARGETS),
                                 "Test MSE against the noiseless target or the noisy labels.")
_SLOPE_MIN_N = flags.DEFINE_integer(
    "slope_min_n", None, "The 'upper' slopes use n >= this (default: the larger half of the grid); "
    "'whole' slopes use every n.")
_PGD_STEPS = flags.DEFINE_integer("pgd_steps", _DEFAULTS.pgd_steps,
                                  "Projected gradient descent steps for the base model.")
_BACKEND = flags.DEFINE_string("backend", _DEFAULTS.backend, "Memory backend for the k-NN search.")


def _ints(values, name):
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise ValueError(f"--{name} must be a comma-separated list of integers, got {values!r}") from None


def _yes_no(flag):
  return "-" if flag is None else ("yes" if flag else "no")


def print_summary(results: dict) -> None:
  """Per d: each model's slopes (whole grid, upper half) with 95% intervals beside the rates from
  theory, then the local slopes between consecutive n."""
  slopes, rates = results["slopes"], results["rates"]
  ns, upper = results["ns"], results["slope_ns"]
  print(f"log-log slopes of test risk against n: mean over {results['config']['seeds']} seeds "
        f"[95% t interval]; whole: n = {ns[0]}..{ns[-1]}, upper: n = {upper[0]}..{upper[-1]}")
  print("asymptote: the slope theory gives as n grows, for this k rule and a linear residual "
        "(at finite n the faster-falling risk terms make slopes steeper)")
  for d in rates:
    rate = rates[d]
    tuned = rate["linear_residual_tuned"]
    print(f"d={d}: Lipschitz rate -2/(2+m) {rate['lipschitz']:+.3f}; "
          f"k ~ n^{rate['k_exponent']:.3f} "
          f"({results['config']['k_rule']}); risk terms noise/bias/spread " + " / ".join(
              "-" if v is None else f"n^{v:+.3f}" for v in rate["terms"].values())
          + ("" if tuned is None else f"; k tuned to a linear residual: {tuned:+.3f}"))
    if results["noise_term_slopes"]:
      noise = results["noise_term_slopes"][d]
      print(f"  noise term noise_std^2/k with the rounded k: slope whole {noise['whole']:+.3f}, "
            f"upper {noise['upper']:+.3f}; k = " + ",".join(
                str(results["k"][d][str(n)]) for n in ns))
    print(f"  {'model':13s} {'whole':26s} {'upper':26s} {'asymptote':>9s}  "
          f"asymptote in CI whole/upper")
    for model, by_d in slopes.items():
      fits = by_d[d]
      predicted = rate["predicted"][model]
      print(f"  {model:13s} {theory.format_slope(fits['whole']):26s} "
            f"{theory.format_slope(fits['upper']):26s} "
            f"{'n/a' if predicted is None else f'{predicted:+.3f}':>9s}  "
            f"{_yes_no(fits['whole']['predicted_in_ci95'])}/"
            f"{_yes_no(fits['upper']['predicted_in_ci95'])}")
    for model, by_d in slopes.items():
      print(f"  local {model:13s} " + " ".join(
          "n/a" if f["slope"] is None else f"{f['slope']:+.2f}\u00b1{f['half_width']:.2f}"
          for f in by_d[d]["local"]))
  print("local slopes run over consecutive pairs of n: " + ", ".join(
      f"{low}-{high}" for low, high in zip(ns[:-1], ns[1:], strict=False)))


def main(argv):
  del argv
  try:
    config = theory.TheoryConfig(
        dims=_ints(_DIMS.value, "dims"), ns=_ints(_NS.value, "ns"), seeds=_SEEDS.value,
        test_size=_TEST_SIZE.value, domain=_DOMAIN.value, noise_std=_NOISE_STD.value,
        theta_norm=_THETA_NORM.value, base_norm=_BASE_NORM.value, k_rule=_K_RULE.value,
        k_scale=_K_SCALE.value, sigma=_SIGMA.value, include_k1=_INCLUDE_K1.value,
        risk_target=_RISK_TARGET.value, slope_min_n=_SLOPE_MIN_N.value,
        pgd_steps=_PGD_STEPS.value, backend=_BACKEND.value).validate()
  except ValueError as err:  # a bad flag value: one line, not a traceback
    raise SystemExit(f"flag error: {err}") from None
  results = theory.run_experiment(config, _WORKDIR.value, log=logging.getLogger(cli_flags.PHASE_LOGGER).info)
  print_summary(results)
  print(f"wrote {_WORKDIR.value}/results.json and {_WORKDIR.value}/{results['plot']}")


TOOL = cli_flags.Tool(
    command="resmem-jax-theory",
    about=(
        "The paper's stylized linear regression: test risk of a norm-constrained linear base vs\n"
        "ResMem over a grid of n, log-log slopes beside the rates theory gives (no --config)."),
    example=("resmem-jax-theory --workdir=/tmp/theory --dims=1,2 --ns=64,256,1024 --seeds=2"))


def run():
  cli_flags.run(main, TOOL)


if __name__ == "__main__":
  run()
