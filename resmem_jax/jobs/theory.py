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

Why the base stalls: on the cube the population covariance is ``I/3``, so the best constrained
predictor is the projection ``theta_L = base_norm * theta*/||theta*||`` and the base risk tends to
``(||theta*|| - base_norm)^2 / 3`` whatever ``n`` is.

What theory predicts for ResMem here. ResMem predicts ``<theta_b, x> + mean_{i in N(x)} (y_i -
<theta_b, x_i>)`` with ``N(x)`` the ``k`` nearest training inputs, so its error at ``x`` is exactly

    mean_{i in N(x)} noise_i + <theta* - theta_b, xbar(x) - x>,    xbar(x) = mean_{i in N(x)} x_i,

and plain k-NN's is the same with ``theta*`` in place of ``theta* - theta_b``. The noise is
independent of the inputs (``theta_b`` depends on it only through an average over all ``n`` points),
so with uniform weights the risk is the noise term ``noise_std^2 / k`` plus a smoothing term
``E<theta* - theta_b, xbar - x>^2``. The two peers share ``N(x)``, and ``theta* - theta_L`` is
parallel to ``theta*``, so k-NN's smoothing term is ``||theta*||^2 / ||theta* - theta_L||^2`` times
ResMem's: ResMem is below k-NN. With ``r ~ (k/n)^(1/m)`` the distance to the ``k``-th neighbour
(``m`` the intrinsic dimension: ``d`` on the cube, ``d - 1`` on the sphere):

* cube interior: given ``r``, the neighbours are uniform in the ball ``B(x, r)``, symmetric about
  ``x``, so ``xbar - x`` has mean zero. A linear residual has no interior bias, only the spread
  ``E|xbar - x|^2 ~ r^2 / k``;
* cube boundary: within ``r`` of a face (a fraction ``~ d r`` of the cube) the ball is cut and
  ``xbar`` moves inwards by ``~ r``, so the integrated squared bias is ``~ r^3 = (k/n)^(3/d)``. A
  general Lipschitz target has bias ``~ r`` everywhere, ``(k/n)^(2/d)``: that case sets the ``k`` of
  the ``"grow"`` rule and the minimax rate ``n^(-2/(2+m))``;
* sphere: no boundary, but the cap around ``x`` curves away from the tangent plane, so
  ``E xbar = (1 - c r^2) x`` and the squared bias is ``~ r^4 = (k/n)^(4/(d-1))``.

With ``k ~ n^a`` the three terms fall as ``n^(-a)`` (noise), ``n^(-(1-a) s/m)`` (bias; ``s = 3`` on
the cube, ``4`` on the sphere) and ``n^(-(1-a) 2/m - a)`` (spread). The slowest one sets the
asymptotic log-log slope (:func:`predicted_slopes`); the faster ones add to the risk at finite
``n``, so measured slopes are steeper than the asymptote and flatten towards it as ``n`` grows. For
``"grow"`` on the cube (``a = 2/(2+d)``) the terms fall as ``n^(-2/(2+d))``, ``n^(-3/(2+d))`` and
``n^(-4/(2+d))``: the asymptotic slope is ``-2/(2+d)`` with noise (the Lipschitz rate's number, set
here by the noise term alone) and ``-3/(2+d)`` without. The ``k`` that balances noise and bias for a
linear residual on the cube is ``k ~ n^(3/(3+d))`` (``k_rule="linear_residual"``), with rate
``n^(-3/(3+d))``. On the sphere both rules still use ``d``, so with noise the slope is ``-a``,
flatter than the Lipschitz rate ``-2/(2+m)`` for ``m = d - 1``. With ``k = 1`` the noise term does
not fall (the noisy risk plateaus) and the noiseless risk is the spread, ``n^(-2/m)``. ``k`` is
rounded up to an integer, so where it is small (large ``d``) the noise term's slope between
neighbouring ``n`` departs from ``-a``; results.json has its slope for the ``k`` actually used
(``noise_term_slopes``). Softmax weights (``sigma``) tend to uniform weights as ``r / sigma -> 0``,
so the exponents hold for them too, but their noise term is
``noise_std^2 * sum(w^2) >= noise_std^2 / k``.
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
# Named k schedules (any positive integer is also a k_rule: a fixed k). "grow": k ~ n^(2/(2+d)),
# tuned for a Lipschitz target; "linear_residual": k ~ n^(3/(3+d)), tuned for a linear residual on
# the cube (noise term against the boundary-layer bias, see the module docstring).
K_RULES = ("grow", "linear_residual")
CONFIDENCE = 0.95  # two-sided level of every slope interval
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
# A risk at or below this, times theta_norm^2, is an exact fit up to float64 rounding (least
# squares without noise lands near 1e-32): it gets no log-log slope.
_ROUNDOFF_RISK = (1e4 * np.finfo(np.float64).eps) ** 2
# Upper bound on query_chunk * n_train distances held at once by one search call (~128 MiB float32).
_MAX_DISTANCES_PER_CHUNK = 1 << 25


@dataclasses.dataclass(frozen=True)
class TheoryConfig:
  """Every choice of the sweep. Defaults run in about five minutes on a 2-core CPU."""
  dims: tuple[int, ...] = (1, 2, 4, 8)
  ns: tuple[int, ...] = tuple(64 * 2 ** i for i in range(11))  # 64, 128, ..., 65536
  seeds: int = 5
  test_size: int = 4096
  domain: str = "cube"
  noise_std: float = 0.1
  theta_norm: float = 1.0
  base_norm: float = 0.5
  k_rule: str = "grow"         # one of K_RULES, or a fixed integer k, e.g. "1"
  k_scale: float = 1.0
  sigma: float | None = None   # None: uniform weights over the k neighbours; else softmax(-dist/sigma)
  include_k1: bool = True      # also report k=1 ResMem and 1-NN (same search, no extra cost)
  risk_target: str = "noiseless"
  slope_min_n: int | None = None  # "upper" slopes on n >= this; None: the larger half of the grid
  pgd_steps: int = 500
  backend: str = "exact"

  def validate(self) -> "TheoryConfig":
    if not self.dims or any(int(d) < 1 for d in self.dims):
      raise ValueError(f"dims must be a non-empty list of positive integers, got {self.dims!r}")
    if len(self.ns) < 2 or any(int(n) < 2 for n in self.ns):
      raise ValueError(f"ns must list at least 2 training set sizes >= 2 (a slope needs two n), "
                       f"got {self.ns!r}")
    if list(self.ns) != sorted(set(self.ns)):
      raise ValueError(f"ns must be strictly increasing, got {self.ns!r}")
    if self.seeds < 2:
      raise ValueError(f"seeds must be >= 2 for slope intervals across seeds, got {self.seeds}; "
                       f"pass --seeds=2 or more")
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
    slope_ns(self)  # raises when slope_min_n leaves fewer than two n
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


def k_exponent(k_rule: str | int, d: int) -> float:
  """``a`` in ``k ~ n^a`` for a k rule: ``2/(2+d)`` for "grow", ``3/(3+d)`` for "linear_residual",
  0 for a fixed ``k``."""
  if k_rule == "grow":
    return 2.0 / (2.0 + d)
  if k_rule == "linear_residual":
    return 3.0 / (3.0 + d)
  try:
    k = int(k_rule)
  except (TypeError, ValueError):
    k = 0
  if k < 1:
    raise ValueError(f"k_rule must be one of {K_RULES} or a positive integer, got {k_rule!r}")
  return 0.0


def neighbours_for(k_rule: str | int, n: int, d: int, k_scale: float = 1.0) -> int:
  """The number of neighbours for ``n`` training points in ``d`` dimensions, capped at ``n``.

  ``"grow"``: ``k = ceil(k_scale * n^(2/(2+d)))``, which balances the squared bias ``(k/n)^(2/d)``
  and the variance ``1/k`` of k-NN regression of a Lipschitz function (minimax rate
  ``n^(-2/(2+d))``). ``"linear_residual"``: ``k = ceil(k_scale * n^(3/(3+d)))``, which balances the
  cube's boundary-layer bias ``(k/n)^(3/d)`` of a linear function against ``1/k`` (rate
  ``n^(-3/(3+d))``). An integer (or its string) is a fixed ``k``.
  """
  exponent = k_exponent(k_rule, d)
  if exponent > 0:
    k = math.ceil(k_scale * n ** exponent - 1e-9)  # the tolerance keeps exact powers exact
  else:
    k = int(k_rule)
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

  low, high = 0.0, float(np.linalg.norm(b) / radius)
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
  outputs: dict[int, list[np.ndarray]] = {k: [] for k in ks}
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


def fit_loglog_slope(ns: Sequence[float] | np.ndarray,
                     risks: Sequence[float] | np.ndarray) -> float:
  """Least-squares slope of ``log(risk)`` against ``log(n)``."""
  ns = np.asarray(ns, np.float64)
  risks = np.asarray(risks, np.float64)
  if ns.shape != risks.shape or ns.size < 2:
    raise ValueError(f"need >= 2 matching (n, risk) pairs, got {ns.size} and {risks.size}")
  if np.any(ns <= 0) or np.any(risks <= 0):
    raise ValueError("ns and risks must be positive for a log-log fit")
  return float(np.polyfit(np.log(ns), np.log(risks), 1)[0])


def slope_interval(ns: Sequence[float], risks_per_seed: Sequence[Sequence[float]] | np.ndarray,
                   level: float = CONFIDENCE, zero_risk: float = 0.0) -> dict:
  """Log-log slope of risk against ``n`` with a ``level`` interval over seeds.

  ``risks_per_seed[s][j]`` is seed ``s``'s risk at ``ns[j]``. Each seed gets its own least-squares
  slope; the result is their mean with a Student-t interval (``seeds - 1`` degrees of freedom).
  Every (seed, n) is an independent draw, so the per-seed slopes are i.i.d. and the t interval
  needs no model of how the spread of log-risk changes with ``n``, which pooled least squares would.
  It covers seed-to-seed variation only: curvature of the log-log curve shows in local slopes.
  Returns ``slope``, ``ci95`` ([low, high]), ``half_width``, ``per_seed`` and ``ns``; the slope
  fields are None when a risk is at most ``zero_risk`` (an exact fit has no log-log slope).
  """
  ns = [int(n) for n in ns]
  risks = np.asarray(risks_per_seed, np.float64)
  if risks.ndim != 2 or risks.shape[1] != len(ns):
    raise ValueError(f"risks_per_seed must be [seeds, {len(ns)}], got shape {risks.shape}")
  if len(ns) < 2:
    raise ValueError(f"a slope needs risks at >= 2 values of n, got {len(ns)}; widen the n range")
  if risks.shape[0] < 2:
    raise ValueError(f"an interval over seeds needs >= 2 seeds, got {risks.shape[0]}; "
                     f"run more seeds")
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}")
  if np.any(risks <= zero_risk):
    return {"ns": ns, "slope": None, "ci95": None, "half_width": None, "per_seed": None}
  from scipy import stats  # pylint: disable=g-import-not-at-top
  per_seed = np.array([fit_loglog_slope(ns, r) for r in risks])
  mean = float(per_seed.mean())
  standard_error = float(per_seed.std(ddof=1) / math.sqrt(per_seed.size))
  half_width = float(stats.t.ppf(0.5 + level / 2, per_seed.size - 1) * standard_error)
  return {"ns": ns, "slope": mean, "ci95": [mean - half_width, mean + half_width],
          "half_width": half_width, "per_seed": [float(v) for v in per_seed]}


def local_slopes(ns: Sequence[float], risks_per_seed: Sequence[Sequence[float]] | np.ndarray,
                 level: float = CONFIDENCE, zero_risk: float = 0.0) -> list[dict]:
  """:func:`slope_interval` for each pair of consecutive ``n``: whether the slope still moves."""
  risks = np.asarray(risks_per_seed, np.float64)
  return [slope_interval(ns[j:j + 2], risks[:, j:j + 2], level, zero_risk)
          for j in range(len(ns) - 1)]


def slope_ns(config: TheoryConfig) -> list[int]:
  """The n values of the "upper" slope fits: n >= slope_min_n, or the larger half of the grid."""
  ns = sorted(int(n) for n in config.ns)
  if config.slope_min_n is None:
    chosen = ns[len(ns) // 2:] if len(ns) >= 4 else ns
  else:
    chosen = [n for n in ns if n >= config.slope_min_n]
  if len(chosen) < 2:
    raise ValueError(f"slope_min_n={config.slope_min_n} leaves {len(chosen)} grid points; need "
                     f">= 2, so lower slope_min_n or add larger n")
  return chosen


def intrinsic_dimension(d: int, domain: str = "cube") -> int:
  """``d`` on the cube, ``d - 1`` on the sphere ``S^{d-1}``."""
  return d if domain == "cube" else max(d - 1, 0)


def theory_rate(d: int, domain: str = "cube") -> float:
  """Exponent of the minimax k-NN rate ``n^(-2/(2+m))`` for Lipschitz targets (``k`` tuned to it);
  ``m`` the intrinsic dimension."""
  return -2.0 / (2.0 + intrinsic_dimension(d, domain))


def risk_terms(a: float, d: int, domain: str = "cube") -> dict[str, float | None]:
  """Exponents of the three parts of a k-NN regressor's risk on a linear target, ``k ~ n^a``.

  ``noise``: ``noise_std^2 / k``; ``bias``: boundary layer ``(k/n)^(3/d)`` on the cube, curvature
  ``(k/n)^(4/m)`` on the sphere; ``spread``: ``(k/n)^(2/m) / k`` (see the module docstring). A
  zero-dimensional domain (``S^0``, two points) has neither bias nor spread once ``k`` is below the
  points per site: None.
  """
  m = intrinsic_dimension(d, domain)
  noise = 0.0 - a  # not -a: a fixed k gives 0.0, not -0.0
  if m == 0:
    return {"noise": noise, "bias": None, "spread": None}
  smoothness = 3.0 if domain == "cube" else 4.0
  return {"noise": noise, "bias": -(1.0 - a) * smoothness / m, "spread": -(1.0 - a) * 2.0 / m - a}


def predicted_slopes(config: TheoryConfig, d: int) -> dict[str, float | None]:
  """Asymptotic log-log slope of each model's test risk in this experiment (None: risk tends to 0
  faster than any power, or is exactly 0).

  The k-NN models follow :func:`risk_terms`, the slowest term winning (no noise term without
  noise); a noisy risk target puts the floor ``noise_std^2`` under every model (slope 0). The base
  stalls at its population risk (slope 0) when ``base_norm < theta_norm``; least squares falls as
  ``n^-1`` with noise and fits exactly without.
  """
  noisy = config.noise_std > 0
  if config.risk_target == "noisy" and noisy:
    return {m: 0.0 for m in MODELS}
  misspecified = config.base_norm < config.theta_norm

  def knn_slope(a):
    terms = risk_terms(a, d, config.domain)
    if not noisy:
      terms["noise"] = None
    present = [v for v in terms.values() if v is not None]
    return max(present) if present else None

  grown = knn_slope(k_exponent(config.k_rule, d))
  single = knn_slope(0.0)
  return {
      "base": 0.0 if misspecified else (-1.0 if noisy else None),
      "least_squares": -1.0 if noisy else None,
      "knn": grown,
      "resmem": grown if misspecified else (-k_exponent(config.k_rule, d) if noisy else None),
      "knn_k1": single,
      "resmem_k1": single if misspecified else (0.0 if noisy else None),
  }


def _contains(interval: list[float] | None, value: float | None) -> bool | None:
  if interval is None or value is None:
    return None
  return bool(interval[0] <= value <= interval[1])


def run_sweep(config: TheoryConfig, memory_builder: Callable | None = None,
              log: Callable[[str], None] | None = None) -> dict:
  """Runs every (d, n, seed) and returns the results dictionary written to results.json."""
  config.validate()
  models = [m for m in MODELS if config.include_k1 or not m.endswith("_k1")]
  # model -> d -> n -> risk per seed; d -> n -> the k used
  per_seed: dict[str, dict[str, dict[str, list[float]]]] = {
      m: {str(d): {} for d in config.dims} for m in models}
  k_used: dict[str, dict[str, int]] = {str(d): {} for d in config.dims}
  for d in config.dims:
    for n in config.ns:
      trials = [run_trial(config, d, n, seed, memory_builder) for seed in range(config.seeds)]
      k_used[str(d)][str(n)] = trials[0][1]
      for m in models:
        per_seed[m][str(d)][str(n)] = [t[0][m] for t in trials]
      if log is not None:
        log(f"d={d} n={n} k={trials[0][1]} " + " ".join(
            f"{m}={np.mean(per_seed[m][str(d)][str(n)]):.3g}" for m in models))

  ns = [int(n) for n in config.ns]
  upper_ns = slope_ns(config)
  rates: dict[str, dict] = {}
  for d in config.dims:
    a = k_exponent(config.k_rule, d)
    rates[str(d)] = {
        "lipschitz": theory_rate(d, config.domain),
        "k_exponent": a,
        "terms": risk_terms(a, d, config.domain),
        "predicted": predicted_slopes(config, d),
        # The rate with k tuned to a linear residual on the cube (k_rule "linear_residual").
        "linear_residual_tuned": -3.0 / (3.0 + d) if config.domain == "cube" else None,
    }
  risks: dict[str, dict[str, dict]] = {}
  slopes: dict[str, dict[str, dict]] = {}
  for m in models:
    risks[m], slopes[m] = {}, {}
    for d in config.dims:
      stats: dict[str, dict] = {}
      for n in ns:
        values = np.asarray(per_seed[m][str(d)][str(n)])
        stats[str(n)] = {"mean": float(values.mean()), "std": float(values.std()),
                         "min": float(values.min()), "max": float(values.max()),
                         "per_seed": [float(v) for v in values]}
      risks[m][str(d)] = stats
      by_seed = np.array([stats[str(n)]["per_seed"] for n in ns]).T  # [seeds, len(ns)]
      upper = by_seed[:, [ns.index(n) for n in upper_ns]]
      zero = _ROUNDOFF_RISK * config.theta_norm ** 2
      fits: dict = {"whole": slope_interval(ns, by_seed, zero_risk=zero),
                    "upper": slope_interval(upper_ns, upper, zero_risk=zero),
                    "local": local_slopes(ns, by_seed, zero_risk=zero)}
      predicted = rates[str(d)]["predicted"][m]
      for fit in [fits["whole"], fits["upper"]] + fits["local"]:
        fit["predicted_in_ci95"] = _contains(fit["ci95"], predicted)
        if m in ("knn", "resmem"):
          fit["lipschitz_in_ci95"] = _contains(fit["ci95"], rates[str(d)]["lipschitz"])
      slopes[m][str(d)] = fits
  # noise_std^2 / k is the averaged label noise in the risk of k-NN and ResMem (uniform weights);
  # its slopes use the rounded k actually used, the finite-n version of the noise term's -a.
  noise_term: dict[str, dict[str, float]] | None = None
  noise_term_slopes: dict[str, dict] | None = None
  if config.sigma is None:
    noise_term = {str(d): {str(n): config.noise_std ** 2 / k_used[str(d)][str(n)] for n in ns}
                  for d in config.dims}
    if config.noise_std > 0:
      noise_term_slopes = {}
      for d in config.dims:
        term = [noise_term[str(d)][str(n)] for n in ns]
        noise_term_slopes[str(d)] = {
            "whole": fit_loglog_slope(ns, term),
            "upper": fit_loglog_slope(upper_ns, [term[ns.index(n)] for n in upper_ns]),
            "local": [fit_loglog_slope(ns[j:j + 2], term[j:j + 2]) for j in range(len(ns) - 1)]}
  return {
      "config": dataclasses.asdict(config),
      "risk": ("mean squared error on a fresh test sample against the noiseless target <theta*, x>"
               if config.risk_target == "noiseless" else
               "mean squared error on a fresh test sample against the noisy target y"),
      "knn_weights": ("uniform over the k nearest" if config.sigma is None
                      else f"softmax(-distance / {config.sigma}) over the k nearest"),
      "ns": ns,
      "slope_ns": upper_ns,
      "slope_method": (
          "per-seed least-squares slope of log(risk) on log(n); mean over seeds with a two-sided "
          f"{CONFIDENCE:.0%} Student-t interval (seeds - 1 degrees of freedom); 'whole': every n, "
          "'upper': n in slope_ns, 'local': consecutive pairs of n"),
      "k": k_used,
      "results": risks,
      "slopes": slopes,
      "rates": rates,
      "noise_term": noise_term,
      "noise_term_slopes": noise_term_slopes,
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


def format_slope(fit: dict) -> str:
  """``-0.712 [-0.731, -0.693]`` (slope and 95% interval), or ``n/a`` for a zero risk."""
  if fit["slope"] is None:
    return "n/a"
  low, high = fit["ci95"]
  return f"{fit['slope']:+.3f} [{low:+.3f}, {high:+.3f}]"


def _short(fit: dict) -> str:
  return "n/a" if fit["slope"] is None else f"{fit['slope']:+.2f}\u00b1{fit['half_width']:.2f}"


def plot_risk_curves(results: dict, path: str) -> None:
  """Log-log test risk against n, one panel per d, mean over seeds with a min-max band."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  dims = list(results["results"]["base"].keys())
  ns = np.asarray(results["ns"], np.float64)
  slopes = results["slopes"]
  fig, axes = plt.subplots(1, len(dims), figsize=(4.4 * len(dims), 4.6), squeeze=False)
  for ax, d in zip(axes[0], dims, strict=True):
    for m, by_d in results["results"].items():
      stats = [by_d[d][str(int(n))] for n in ns]
      if slopes[m][d]["whole"]["slope"] is None:
        continue  # an exact fit (rounding-level risk) would only stretch the axis
      style = dict(_MODEL_STYLE[m])
      ax.plot(ns, [s["mean"] for s in stats], markersize=4, **style)
      ax.fill_between(ns, [s["min"] for s in stats], [s["max"] for s in stats],
                      color=style["color"], alpha=0.12, linewidth=0)
    # Reference slopes anchored at ResMem's risk at the largest n: the Lipschitz rate and the
    # rate predicted for this k rule and a linear residual.
    anchor = max(results["results"]["resmem"][d][str(int(ns[-1]))]["mean"], 1e-300)
    lipschitz = results["rates"][d]["lipschitz"]
    predicted = results["rates"][d]["predicted"]["resmem"]
    ax.plot(ns, anchor * (ns / ns[-1]) ** lipschitz, color="black", linestyle="--", linewidth=1,
            label="Lipschitz k-NN rate n^(-2/(2+m))")
    if predicted is not None and predicted != lipschitz:
      ax.plot(ns, anchor * (ns / ns[-1]) ** predicted, color="black", linestyle=":", linewidth=1,
              label="predicted for this k rule, linear residual")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training set size n")
    resmem, knn = slopes["resmem"][d], slopes["knn"][d]
    ax.set_title(f"d = {d}: slopes whole / upper (95% CI over seeds)\n"
                 f"ResMem {_short(resmem['whole'])} / {_short(resmem['upper'])}, "
                 f"k-NN {_short(knn['whole'])} / {_short(knn['upper'])}\n"
                 f"Lipschitz {lipschitz:+.2f}, predicted "
                 f"{'n/a' if predicted is None else f'{predicted:+.2f}'}", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel("test MSE vs " + (
      "noiseless target" if results["config"]["risk_target"] == "noiseless" else "noisy target"))
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8,
             frameon=False)
  fig.suptitle("Stylized linear regression: test risk against n (mean over seeds, band: min-max; "
               f"upper slopes on n >= {results['slope_ns'][0]})", fontsize=10)
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
