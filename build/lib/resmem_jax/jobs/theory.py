"""The paper's stylized linear regression, as an experiment: test risk of a base model vs ResMem.

Setting (every choice is an argument of :class:`TheoryConfig`):

* inputs ``x`` uniform on the cube ``[-1, 1]^d`` (or uniform on the unit sphere ``S^{d-1}``);
* target ``y = <theta*, x> + noise``, ``||theta*|| = theta_norm``, noise Gaussian with standard
  deviation ``noise_std`` (0 allowed); the direction of ``theta*`` is drawn per seed;
* base model: linear, ``||theta|| <= base_norm`` with ``base_norm < theta_norm`` (low capacity), fitted
  by projected gradient descent in JAX (:func:`fit_constrained_pgd`), which is checked against the
  closed-form constrained least-squares solution (:func:`constrained_least_squares`);
* ResMem: base plus a k-nearest-neighbour regressor on the raw inputs, fitted to the base model's
  training residuals, served by the project's memory core (``resmem_jax.build_memory``, ``exact``
  backend);
* peers: plain k-NN regression of ``y`` (no base model) and unconstrained least squares.

Test risk is the mean squared error on a fresh test sample, against the noiseless target
``<theta*, x>`` by default (the excess risk; ``risk_target="noisy"`` adds the noise, which puts a floor
of ``noise_std**2`` under every model).

Why the base stalls and ResMem does not: on the cube the population covariance is ``I/3``, so the
best constrained predictor is the projection ``theta_L = base_norm * theta*/||theta*||`` and the base
risk tends to ``(||theta*|| - base_norm)^2 / 3`` whatever ``n`` is. Its residual ``<theta* - theta_L, x>``
is a Lipschitz function, which k-NN regression learns at the rate ``n^(-2/(2+d))`` when ``k`` grows
like ``n^(2/(2+d))`` (that ``k`` balances the squared bias ``(k/n)^(2/d)`` and the variance
``noise_std^2/k``). ResMem and plain k-NN use the same neighbours (both search on ``x``), so their
noise averaging is identical, but the bias of ResMem is the bias of k-NN on the residual, whose
Lipschitz constant ``||theta*|| - base_norm`` is smaller than ``||theta*||``: ResMem is below k-NN.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resmem_jax.core import predictor
from resmem_jax.jsonio import write_json_atomic

DOMAINS = ("cube", "sphere")
RISK_TARGETS = ("noiseless", "noisy")
# Models in the order they are plotted; "resmem_k1"/"knn_k1" only when TheoryConfig.include_k1.
MODELS = ("base", "least_squares", "knn", "resmem", "knn_k1", "resmem_k1")
_MODEL_STYLE = {
    "base": dict(color="tab:blue", marker="o", label="base: linear, ||theta|| <= L"),
    "least_squares": dict(color="tab:gray", marker="s", label="least squares (unconstrained)"),
    "knn": dict(color="tab:orange", marker="^", label="k-NN on y"),
    "resmem": dict(color="tab:red", marker="D", label="ResMem (base + k-NN on residuals)"),
    "knn_k1": dict(color="tab:orange", marker="v", linestyle=":", label="1-NN on y"),
    "resmem_k1": dict(color="tab:red", marker="d", linestyle=":", label="ResMem, k=1"),
}
# Upper bound on query_chunk * n_train distances held at once by one search call (~128 MiB float32).
_MAX_DISTANCES_PER_CHUNK = 1 << 25


@dataclasses.dataclass(frozen=True)
class TheoryConfig:
  """Every choice of the sweep. Defaults run in a few minutes on a 2-core CPU."""
  dims: tuple[int, ...] = (1, 2, 4, 8)
  ns: tuple[int, ...] = (64, 256, 1024, 4096, 16384, 65536)
  seeds: int = 3
  test_size: int = 4096
  domain: str = "cube"
  noise_std: float = 0.1
  theta_norm: float = 1.0
  base_norm: float = 0.5
  k_rule: str = "grow"         # "grow": k = ceil(k_scale * n^(2/(2+d))); or a fixed integer, e.g. "1"
  k_scale: float = 1.0
  sigma: float | None = None   # None: uniform weights over the k neighbours; else softmax(-dist/sigma)
  include_k1: bool = True      # also report k=1 ResMem and 1-NN (same search, no extra cost)
  risk_target: str = "noiseless"
  slope_min_n: int | None = None  # fit slopes on n >= this; None: the larger half of the grid
  pgd_steps: int = 500
  backend: str = "exact"

  def validate(self) -> "TheoryConfig":
    if not self.dims or any(int(d) < 1 for d in self.dims):
      raise ValueError(f"dims must be a non-empty list of positive integers, got {self.dims!r}")
    if not self.ns or any(int(n) < 2 for n in self.ns):
      raise ValueError(f"ns must be a non-empty list of integers >= 2, got {self.ns!r}")
    if list(self.ns) != sorted(set(self.ns)):
      raise ValueError(f"ns must be strictly increasing, got {self.ns!r}")
    if self.seeds < 1:
      raise ValueError(f"seeds must be >= 1, got {self.seeds}")
    if self.test_size < 1:
      raise ValueError(f"test_size must be >= 1, got {self.test_size}")
    if self.domain not in DOMAINS:
      raise ValueError(f"domain must be one of {DOMAINS}, got {self.domain!r}")
    if not self.noise_std >= 0:
      raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
    if not self.theta_norm > 0:
      raise ValueError(f"theta_norm must be > 0, got {self.theta_norm}")
    if not self.base_norm > 0:
      raise ValueError(f"base_norm must be > 0, got {self.base_norm}")
    if self.risk_target not in RISK_TARGETS:
      raise ValueError(f"risk_target must be one of {RISK_TARGETS}, got {self.risk_target!r}")
    if self.sigma is not None and not self.sigma > 0:
      raise ValueError(f"sigma must be > 0 or None (uniform weights), got {self.sigma}")
    if not self.k_scale > 0:
      raise ValueError(f"k_scale must be > 0, got {self.k_scale}")
    if self.pgd_steps < 1:
      raise ValueError(f"pgd_steps must be >= 1, got {self.pgd_steps}")
    neighbours_for(self.k_rule, max(self.ns), 1, self.k_scale)  # raises on a bad k_rule
    return self


# ----------------------------------------------------------------------------------------------
# Data.


def sample_inputs(rng: np.random.Generator, n: int, d: int, domain: str = "cube") -> np.ndarray:
  """``n`` points uniform on ``[-1, 1]^d`` (``"cube"``) or on the unit sphere ``S^{d-1}``, float64."""
  if n < 1 or d < 1:
    raise ValueError(f"n and d must be >= 1, got n={n}, d={d}")
  if domain == "cube":
    return rng.uniform(-1.0, 1.0, size=(n, d))
  if domain == "sphere":
    # A normalised standard Gaussian is uniform on the sphere (rotation invariance).
    g = rng.standard_normal(size=(n, d))
    norms = np.linalg.norm(g, axis=1, keepdims=True)
    return g / np.maximum(norms, np.finfo(np.float64).tiny)
  raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")


def sample_theta_star(rng: np.random.Generator, d: int, norm: float) -> np.ndarray:
  """A direction uniform on the sphere, scaled to ``norm``."""
  return norm * sample_inputs(rng, 1, d, "sphere")[0]


def neighbours_for(k_rule: str | int, n: int, d: int, k_scale: float = 1.0) -> int:
  """The number of neighbours for ``n`` training points in ``d`` dimensions.

  ``k_rule="grow"``: ``k = ceil(k_scale * n^(2/(2+d)))``, the choice that balances the squared
  bias ``(k/n)^(2/d)`` and the variance ``1/k`` of k-NN regression of a Lipschitz function and gives
  the minimax rate ``n^(-2/(2+d))``. An integer (or its string) is a fixed ``k``. Capped at ``n``.
  """
  if k_rule == "grow":
    k = math.ceil(k_scale * n ** (2.0 / (2.0 + d)) - 1e-9)
  else:
    try:
      k = int(k_rule)
    except (TypeError, ValueError):
      raise ValueError(f"k_rule must be 'grow' or a positive integer, got {k_rule!r}") from None
    if k < 1:
      raise ValueError(f"k_rule must be 'grow' or a positive integer, got {k_rule!r}")
  return int(max(1, min(k, n)))


# ----------------------------------------------------------------------------------------------
# Constrained least squares: closed form (NumPy, float64) and projected gradient descent (JAX).


def gram_statistics(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(A, b) = (X^T X / n, X^T y / n)``: the empirical loss is ``theta^T A theta - 2 b^T theta + c``."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64).reshape(-1)
  if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
    raise ValueError(f"x must be [n, d] and y [n] with n >= 1, got {x.shape} and {y.shape}")
  n = x.shape[0]
  return x.T @ x / n, x.T @ y / n


def constrained_least_squares(x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
  """``argmin_{||theta|| <= radius} mean((x theta - y)^2)``, exactly (float64).

  If the minimum-norm least-squares solution is inside the ball it is the answer. Otherwise the
  constraint is active and the Lagrangian gives ``theta(mu) = (A + mu I)^{-1} b`` with ``mu > 0``
  solving the secular equation ``||theta(mu)||^2 = sum_i c_i^2 / (lambda_i + mu)^2 = radius^2``
  (``A = V diag(lambda) V^T``, ``c = V^T b``). The left side falls strictly in ``mu``, so the
  root is bracketed by ``(0, ||b|| / radius]`` and found by bisection to float64 precision. ``A`` is
  positive semi-definite, so there is no "hard case": any direction with ``lambda_i = 0`` has
  ``c_i = 0`` because ``b`` lies in the row space of ``x``.
  """
  if not radius > 0:
    raise ValueError(f"radius must be > 0, got {radius}")
  a, b = gram_statistics(x, y)
  eigenvalues, eigenvectors = np.linalg.eigh(a)
  eigenvalues = np.maximum(eigenvalues, 0.0)
  c = eigenvectors.T @ b
  scale = max(float(eigenvalues.max()), 1e-300)
  in_range = eigenvalues > 1e-12 * scale
  free_coef = np.where(in_range, c / np.where(in_range, eigenvalues, 1.0), 0.0)
  if np.linalg.norm(free_coef) <= radius:
    return eigenvectors @ free_coef

  def norm_at(mu):
    return np.linalg.norm(c / (eigenvalues + mu))

  low, high = 0.0, np.linalg.norm(b) / radius
  for _ in range(200):  # bisection halves the bracket; 200 halvings reach float64 resolution
    mid = 0.5 * (low + high)
    if mid <= low or mid >= high:
      break
    if norm_at(mid) > radius:
      low = mid
    else:
      high = mid
  theta = eigenvectors @ (c / (eigenvalues + high))
  return theta * min(1.0, radius / np.linalg.norm(theta))  # last ulp: stay feasible


def project_to_ball(theta: jax.Array, radius: float) -> jax.Array:
  """Euclidean projection onto ``{||theta|| <= radius}``."""
  norm = jnp.linalg.norm(theta)
  return theta * jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-30))


def fit_constrained_pgd(x: np.ndarray, y: np.ndarray, radius: float, steps: int = 500) -> np.ndarray:
  """Projected gradient descent in JAX on ``mean((x theta - y)^2)`` s.t. ``||theta|| <= radius``.

  The empirical loss is a quadratic in ``theta`` fixed by ``(A, b) = (X^T X/n, X^T y/n)``, so each
  step costs ``O(d^2)`` whatever ``n`` is (and one compilation serves every ``n``). Step size
  ``1 / (2 lambda_max(A))``, the inverse smoothness constant, which makes the iteration monotone;
  the cube's ``A`` is close to ``I/3``, so a few hundred steps reach float32 precision.
  """
  if not radius > 0:
    raise ValueError(f"radius must be > 0, got {radius}")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  a, b = gram_statistics(x, y)
  theta = _pgd(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
               jnp.float32(radius), int(steps))
  return np.asarray(theta, np.float64)


@functools.partial(jax.jit, static_argnums=(3,))
def _pgd(a, b, radius, steps):
  def loss(theta):  # mean squared error up to the constant mean(y^2)
    return theta @ a @ theta - 2.0 * b @ theta

  step_size = 1.0 / (2.0 * jnp.maximum(jnp.linalg.eigvalsh(a)[-1], 1e-12))
  grad = jax.grad(loss)

  def body(_, theta):
    return project_to_ball(theta - step_size * grad(theta), radius)

  return jax.lax.fori_loop(0, steps, body, jnp.zeros_like(b))


def least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Unconstrained (minimum-norm) least squares, float64."""
  return np.linalg.lstsq(np.asarray(x, np.float64), np.asarray(y, np.float64), rcond=None)[0]


# ----------------------------------------------------------------------------------------------
# Neighbour regression through the memory core.


def default_memory_builder() -> Callable:
  """``resmem_jax.build_memory`` (imported late so this module loads without the memory core)."""
  from resmem_jax.memory import build_memory  # pylint: disable=g-import-not-at-top
  return build_memory


def neighbour_estimates(memory, queries: np.ndarray, ks: Sequence[int],
                        sigma: float | None) -> dict[int, np.ndarray]:
  """k-NN estimates of the stored values at ``queries``, one ``[q, C]`` array per ``k`` in ``ks``.

  One ``memory.search`` with the largest ``k`` serves every ``k``: results are sorted by distance,
  so the first ``k`` columns are the ``k`` nearest. Weights are uniform over the ``k`` neighbours
  when ``sigma`` is None (the k-NN regressor of the theory), else ``softmax(-distance / sigma)``
  (the ResMem weighting: small ``sigma`` approaches 1-NN, large ``sigma`` approaches uniform).
  Queries go in chunks so that one search never holds more than ~2^25 distances.
  """
  ks = sorted(set(int(k) for k in ks))
  if not ks or ks[0] < 1:
    raise ValueError(f"ks must be positive integers, got {ks}")
  k_max = ks[-1]
  queries = np.asarray(queries, np.float32)
  chunk = max(1, _MAX_DISTANCES_PER_CHUNK // max(1, memory.size))
  outputs = {k: [] for k in ks}
  for start in range(0, queries.shape[0], chunk):
    distances, indices = memory.search(queries[start:start + chunk], k_max)
    values = np.asarray(memory.gather_residuals(indices), np.float64)  # [q, k_max, C]
    distances = np.asarray(distances, np.float64)
    for k in ks:
      outputs[k].append(_weighted_mean(distances[:, :k], values[:, :k], sigma))
  return {k: np.concatenate(parts, axis=0) for k, parts in outputs.items()}


def _weighted_mean(distances: np.ndarray, values: np.ndarray, sigma: float | None) -> np.ndarray:
  if sigma is None:
    return values.mean(axis=1)
  weights = predictor.neighbour_weights(jnp.asarray(distances, jnp.float32), float(sigma))
  return np.asarray(predictor.residual_estimate(weights, jnp.asarray(values, jnp.float32)),
                    np.float64)


# ----------------------------------------------------------------------------------------------
# One problem instance and the sweep.


def run_trial(config: TheoryConfig, d: int, n: int, seed: int,
              memory_builder: Callable | None = None) -> tuple[dict[str, float], int]:
  """Test risk of every model on one draw of (theta*, train, test). Returns (risks, k)."""
  build_memory = memory_builder or default_memory_builder()
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(d), int(n)]))
  theta_star = sample_theta_star(rng, d, config.theta_norm)
  x_train = sample_inputs(rng, n, d, config.domain)
  y_train = x_train @ theta_star + config.noise_std * rng.standard_normal(n)
  x_test = sample_inputs(rng, config.test_size, d, config.domain)
  target_test = x_test @ theta_star
  if config.risk_target == "noisy":
    target_test = target_test + config.noise_std * rng.standard_normal(config.test_size)

  theta_base = fit_constrained_pgd(x_train, y_train, config.base_norm, config.pgd_steps)
  theta_ls = least_squares(x_train, y_train)
  base_train = x_train @ theta_base
  base_test = x_test @ theta_base

  # One memory, two stored columns: the base residual (ResMem) and y itself (plain k-NN). Both
  # regressors search on the raw x, so they share the neighbours and one search serves both.
  residual_train = y_train - base_train
  stored = np.stack([residual_train, y_train], axis=1).astype(np.float32)
  memory = build_memory(x_train.astype(np.float32), stored, backend=config.backend)
  k = neighbours_for(config.k_rule, n, d, config.k_scale)
  ks = (k, 1) if config.include_k1 else (k,)
  estimates = neighbour_estimates(memory, x_test, ks, config.sigma)

  def risk(prediction):
    return float(np.mean((prediction - target_test) ** 2))

  risks = {
      "base": risk(base_test),
      "least_squares": risk(x_test @ theta_ls),
      "knn": risk(estimates[k][:, 1]),
      "resmem": risk(base_test + estimates[k][:, 0]),
  }
  if config.include_k1:
    risks["knn_k1"] = risk(estimates[1][:, 1])
    risks["resmem_k1"] = risk(base_test + estimates[1][:, 0])
  return risks, k


def fit_loglog_slope(ns: Sequence[float], risks: Sequence[float]) -> float:
  """Least-squares slope of ``log(risk)`` against ``log(n)``."""
  ns = np.asarray(ns, np.float64)
  risks = np.asarray(risks, np.float64)
  if ns.shape != risks.shape or ns.size < 2:
    raise ValueError(f"need >= 2 matching (n, risk) pairs, got {ns.size} and {risks.size}")
  if np.any(ns <= 0) or np.any(risks <= 0):
    raise ValueError("ns and risks must be positive for a log-log fit")
  return float(np.polyfit(np.log(ns), np.log(risks), 1)[0])


def slope_ns(config: TheoryConfig) -> list[int]:
  """The n values used for slope fits: n >= slope_min_n, or the larger half of the grid."""
  ns = sorted(int(n) for n in config.ns)
  if config.slope_min_n is None:
    chosen = ns[len(ns) // 2:] if len(ns) >= 4 else ns
  else:
    chosen = [n for n in ns if n >= config.slope_min_n]
  if len(chosen) < 2:
    raise ValueError(f"slope_min_n={config.slope_min_n} leaves {len(chosen)} grid points; need >= 2")
  return chosen


def theory_rate(d: int, domain: str = "cube") -> float:
  """Exponent of the k-NN rate ``n^(-2/(2+m))`` for Lipschitz targets; ``m`` the intrinsic dimension
  (``d`` on the cube, ``d - 1`` on the sphere ``S^{d-1}``)."""
  intrinsic = d if domain == "cube" else max(d - 1, 0)
  return -2.0 / (2.0 + intrinsic)


def run_sweep(config: TheoryConfig, memory_builder: Callable | None = None,
              log: Callable[[str], None] | None = None) -> dict:
  """Runs every (d, n, seed) and returns the results dictionary written to results.json."""
  config.validate()
  models = [m for m in MODELS if config.include_k1 or not m.endswith("_k1")]
  per_seed = {m: {str(d): {} for d in config.dims} for m in models}
  k_used = {str(d): {} for d in config.dims}
  for d in config.dims:
    for n in config.ns:
      trials = [run_trial(config, d, n, seed, memory_builder) for seed in range(config.seeds)]
      k_used[str(d)][str(n)] = trials[0][1]
      for m in models:
        per_seed[m][str(d)][str(n)] = [t[0][m] for t in trials]
      if log is not None:
        log(f"d={d} n={n} k={trials[0][1]} " + " ".join(
            f"{m}={np.mean(per_seed[m][str(d)][str(n)]):.3g}" for m in models))

  fit_ns = slope_ns(config)
  risks, slopes = {}, {}
  for m in models:
    risks[m], slopes[m] = {}, {}
    for d in config.dims:
      stats = {}
      for n in config.ns:
        values = np.asarray(per_seed[m][str(d)][str(n)])
        stats[str(n)] = {"mean": float(values.mean()), "std": float(values.std()),
                         "min": float(values.min()), "max": float(values.max()),
                         "per_seed": [float(v) for v in values]}
      risks[m][str(d)] = stats
      means = [stats[str(n)]["mean"] for n in fit_ns]
      # An exact fit (risk 0, e.g. least squares without noise) has no log-log slope: null.
      slopes[m][str(d)] = fit_loglog_slope(fit_ns, means) if min(means) > 0 else None
  return {
      "config": dataclasses.asdict(config),
      "risk": ("mean squared error on a fresh test sample against the noiseless target <theta*, x>"
               if config.risk_target == "noiseless" else
               "mean squared error on a fresh test sample against the noisy target y"),
      "knn_weights": ("uniform over the k nearest" if config.sigma is None
                      else f"softmax(-distance / {config.sigma}) over the k nearest"),
      "ns": [int(n) for n in config.ns],
      "slope_ns": fit_ns,
      "k": k_used,
      "results": risks,
      "slopes": slopes,
      "theory_slopes": {str(d): theory_rate(d, config.domain) for d in config.dims},
      "base_population_risk": {
          str(d): _base_population_risk(config, d) for d in config.dims},
  }


def _base_population_risk(config: TheoryConfig, d: int) -> float | None:
  """Limit of the base risk as n grows (cube: covariance I/3; sphere: I/d), noiseless target."""
  gap = max(config.theta_norm - config.base_norm, 0.0)
  variance = 1.0 / 3.0 if config.domain == "cube" else 1.0 / d
  noise = config.noise_std ** 2 if config.risk_target == "noisy" else 0.0
  return gap ** 2 * variance + noise


# ----------------------------------------------------------------------------------------------
# Output.


def _fmt(slope: float | None) -> str:
  return "n/a" if slope is None else f"{slope:+.2f}"


def plot_risk_curves(results: dict, path: str) -> None:
  """Log-log test risk against n, one panel per d, mean over seeds with a min-max band."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  dims = list(results["results"]["base"].keys())
  ns = np.asarray(results["ns"], np.float64)
  slopes = results["slopes"]
  fig, axes = plt.subplots(1, len(dims), figsize=(4.2 * len(dims), 4.4), squeeze=False)
  for ax, d in zip(axes[0], dims):
    for m, by_d in results["results"].items():
      stats = [by_d[d][str(int(n))] for n in ns]
      style = dict(_MODEL_STYLE[m])
      ax.plot(ns, [s["mean"] for s in stats], markersize=4, **style)
      ax.fill_between(ns, [s["min"] for s in stats], [s["max"] for s in stats],
                      color=style["color"], alpha=0.12, linewidth=0)
    # Reference line with the theory's slope, anchored at ResMem's risk at the largest n.
    rate = results["theory_slopes"][d]
    anchor = max(results["results"]["resmem"][d][str(int(ns[-1]))]["mean"], 1e-300)
    ax.plot(ns, anchor * (ns / ns[-1]) ** rate, color="black", linestyle="--", linewidth=1,
            label="k-NN theory n^(-2/(2+d))")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training set size n")
    ax.set_title(f"d = {d}\nslopes: base {_fmt(slopes['base'][d])}, ResMem {_fmt(slopes['resmem'][d])}, "
                 f"k-NN {_fmt(slopes['knn'][d])} (theory {rate:+.2f})", fontsize=8.5)
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel("test MSE vs " + (
      "noiseless target" if results["config"]["risk_target"] == "noiseless" else "noisy target"))
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8,
             frameon=False)
  fig.suptitle("Stylized linear regression: test risk against n (mean over seeds, band: min-max; "
               f"slopes fitted on n >= {results['slope_ns'][0]})", fontsize=10)
  fig.tight_layout(rect=(0, 0.12, 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_experiment(config: TheoryConfig, workdir: str, memory_builder: Callable | None = None,
                   log: Callable[[str], None] | None = None) -> dict:
  """Sweep, then write ``workdir/results.json`` and ``workdir/risk_vs_n.png``. Returns the results."""
  if not workdir:
    raise ValueError("workdir must be a non-empty path")
  results = run_sweep(config, memory_builder, log)
  os.makedirs(workdir, exist_ok=True)
  plot_path = os.path.join(workdir, "risk_vs_n.png")
  results["plot"] = os.path.basename(plot_path)
  write_json_atomic(os.path.join(workdir, "results.json"), results, indent=1)
  plot_risk_curves(results, plot_path)
  return results
