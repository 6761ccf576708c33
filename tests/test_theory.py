"""Tests for resmem_jax/jobs/theory.py and experiments/linear_regression.py (stylized linear regression)."""
import json
import math
import pathlib

import numpy as np
import pytest

from conftest import run_python
from resmem_jax.jobs import theory


def _numpy_knn(keys, values, queries, k):
  """Reference k-NN: brute-force Euclidean distances in float64, stable sort (ties: lower index)."""
  diff = queries[:, None, :].astype(np.float64) - keys[None, :, :].astype(np.float64)
  distances = np.sqrt(np.sum(diff * diff, axis=-1))
  order = np.argsort(distances, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(distances, order, axis=1), values[order]


def _loss(x, y, theta):
  return np.mean((x @ theta - y) ** 2)


def test_sample_inputs_cube_and_sphere():
  rng = np.random.default_rng(0)
  cube = theory.sample_inputs(rng, 5000, 3, "cube")
  assert cube.shape == (5000, 3)
  assert cube.min() >= -1.0 and cube.max() <= 1.0
  np.testing.assert_allclose(cube.var(axis=0), 1.0 / 3.0, atol=0.03)  # uniform on [-1, 1]
  sphere = theory.sample_inputs(rng, 5000, 4, "sphere")
  np.testing.assert_allclose(np.linalg.norm(sphere, axis=1), 1.0, atol=1e-12)
  np.testing.assert_allclose(sphere.mean(axis=0), 0.0, atol=0.05)
  with pytest.raises(ValueError, match="domain"):
    theory.sample_inputs(rng, 4, 2, "torus")


def test_neighbours_for_grow_rule_and_fixed():
  assert theory.neighbours_for("grow", 64, 1) == 16  # 64^(2/3)
  assert theory.neighbours_for("grow", 4096, 2) == 64  # 4096^(1/2)
  assert theory.neighbours_for("grow", 4096, 4) == 16  # 4096^(1/3)
  assert theory.neighbours_for("grow", 64, 8) == math.ceil(64 ** 0.2)
  assert theory.neighbours_for("1", 100, 3) == 1
  assert theory.neighbours_for(50, 10, 3) == 10  # capped at n
  with pytest.raises(ValueError, match="k_rule"):
    theory.neighbours_for("many", 10, 1)
  with pytest.raises(ValueError, match="k_rule"):
    theory.neighbours_for(0, 10, 1)


@pytest.mark.parametrize("d,n", [(1, 50), (3, 200), (8, 1000), (8, 5)])
def test_constrained_least_squares_satisfies_kkt(d, n):
  rng = np.random.default_rng(d * 100 + n)
  x = theory.sample_inputs(rng, n, d)
  y = x @ theory.sample_theta_star(rng, d, 2.0) + 0.1 * rng.standard_normal(n)
  radius = 0.7
  theta = theory.constrained_least_squares(x, y, radius)
  # Active constraint (||theta_ls|| ~ 2 > 0.7): on the sphere, and the gradient points inwards
  # along -theta (KKT: grad = -2 mu theta with mu >= 0).
  assert np.linalg.norm(theta) == pytest.approx(radius, rel=1e-9)
  grad = 2.0 * x.T @ (x @ theta - y) / n
  cosine = grad @ theta / (np.linalg.norm(grad) * np.linalg.norm(theta))
  assert cosine == pytest.approx(-1.0, abs=1e-8)
  # No feasible point does better.
  candidates = theory.sample_inputs(rng, 2000, d, "sphere") * radius * rng.uniform(0, 1, (2000, 1))
  best = min(_loss(x, y, c) for c in candidates)
  assert _loss(x, y, theta) <= best + 1e-12


def test_constrained_least_squares_inactive_is_least_squares():
  rng = np.random.default_rng(1)
  x = theory.sample_inputs(rng, 300, 4)
  y = x @ theory.sample_theta_star(rng, 4, 0.5)
  np.testing.assert_allclose(theory.constrained_least_squares(x, y, 10.0),
                             theory.least_squares(x, y), atol=1e-12)
  with pytest.raises(ValueError, match="radius"):
    theory.constrained_least_squares(x, y, 0.0)


@pytest.mark.parametrize("d,n,radius", [(1, 64, 0.5), (2, 256, 0.5), (4, 1024, 0.3), (8, 4096, 0.5),
                                        (8, 6, 0.5), (4, 500, 5.0)])
def test_projected_gradient_descent_matches_closed_form(d, n, radius):
  rng = np.random.default_rng(7 * d + n)
  x = theory.sample_inputs(rng, n, d)
  y = x @ theory.sample_theta_star(rng, d, 1.0) + 0.1 * rng.standard_normal(n)
  closed = theory.constrained_least_squares(x, y, radius)
  pgd = theory.fit_constrained_pgd(x, y, radius, steps=500 if n > d else 5000)
  np.testing.assert_allclose(pgd, closed, atol=2e-4)
  assert np.linalg.norm(pgd) <= radius * (1 + 1e-6)


def test_fit_loglog_slope_recovers_power_law():
  ns = np.array([64, 256, 1024, 4096])
  assert theory.fit_loglog_slope(ns, 3.0 * ns ** -0.4) == pytest.approx(-0.4, abs=1e-12)
  with pytest.raises(ValueError, match="positive"):
    theory.fit_loglog_slope(ns, [1.0, 0.0, 1.0, 1.0])


def test_slope_ns_and_config_validation():
  assert theory.slope_ns(theory.TheoryConfig(ns=(64, 256, 1024, 4096, 16384, 65536))) == [
      4096, 16384, 65536]
  assert theory.slope_ns(theory.TheoryConfig(ns=(64, 256, 1024), slope_min_n=256)) == [256, 1024]
  for bad, word in [(dict(domain="torus"), "domain"), (dict(ns=(256, 64)), "ns"),
                    (dict(noise_std=-1.0), "noise_std"), (dict(sigma=0.0), "sigma"),
                    (dict(k_rule="lots"), "k_rule"), (dict(risk_target="train"), "risk_target"),
                    (dict(dims=(0,)), "dims")]:
    with pytest.raises(ValueError, match=word):
      theory.TheoryConfig(**bad).validate()


@pytest.mark.parametrize("sigma", [None, 0.3])
def test_neighbour_estimates_match_numpy_knn(sigma):
  build_memory = theory.default_memory_builder()
  rng = np.random.default_rng(3)
  keys = theory.sample_inputs(rng, 500, 3).astype(np.float32)
  values = rng.standard_normal((500, 2)).astype(np.float32)
  queries = theory.sample_inputs(rng, 64, 3).astype(np.float32)
  memory = build_memory(keys, values, backend="exact")
  estimates = theory.neighbour_estimates(memory, queries, (1, 7), sigma)
  for k in (1, 7):
    distances, neighbour_values = _numpy_knn(keys, values, queries, k)
    if sigma is None:
      weights = np.full_like(distances, 1.0 / k)
    else:
      weights = np.exp(-(distances - distances[:, :1]) / sigma)
      weights /= weights.sum(axis=1, keepdims=True)
    expected = np.einsum("qk,qkc->qc", weights, neighbour_values)
    np.testing.assert_allclose(estimates[k], expected, atol=1e-5)


def test_sweep_shows_base_flat_and_resmem_falling():
  # Fixed seeds; margins are several times the seed-to-seed spread seen on this grid.
  config = theory.TheoryConfig(dims=(1, 4), ns=(64, 256, 1024, 4096), seeds=2, test_size=1000)
  results = theory.run_sweep(config)
  slopes = results["slopes"]
  for d in ("1", "4"):
    assert abs(slopes["base"][d]) < 0.1, slopes["base"]
    assert slopes["resmem"][d] < -0.3, slopes["resmem"]
    largest = results["results"]
    risk = {m: largest[m][d]["4096"]["mean"] for m in ("base", "resmem", "knn")}
    assert risk["resmem"] < 0.2 * risk["base"], risk
    assert risk["resmem"] < 0.7 * risk["knn"], risk
    # The base risk sits at its population limit (||theta*|| - L)^2 / 3.
    assert risk["base"] == pytest.approx(results["base_population_risk"][d], rel=0.15)
  assert slopes["resmem"]["1"] < slopes["resmem"]["4"] - 0.1  # steeper in low dimension
  assert results["k"]["1"]["4096"] == 256 and results["k"]["4"]["4096"] == 16


def test_binary_writes_results_and_plot(tmp_path):
  workdir = tmp_path / "theory"
  run_python(
      "import sys\n"
      "from absl import app\n"
      "from resmem_jax.cli import theory as binary\n"
      f"sys.argv = ['linear_regression', '--workdir={workdir}', '--dims=1,2', '--ns=64,128,256',\n"
      "            '--seeds=2', '--test_size=200', '--noise_std=0.2', '--sigma=0.5']\n"
      "app.run(binary.main)\n")
  results = json.loads((workdir / "results.json").read_text())
  assert set(results["slopes"]) >= {"base", "resmem", "knn"}
  assert set(results["slopes"]["resmem"]) == {"1", "2"}
  entry = results["results"]["resmem"]["2"]["128"]
  assert len(entry["per_seed"]) == 2 and entry["min"] <= entry["mean"] <= entry["max"]
  assert results["config"]["sigma"] == 0.5 and results["config"]["noise_std"] == 0.2
  assert results["theory_slopes"]["2"] == pytest.approx(-0.5)
  png = pathlib.Path(workdir / results["plot"]).read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_zero_risk_model_gets_null_slope(monkeypatch):
  # Least squares without noise can fit exactly (risk 0.0): no log-log slope, and no crash.
  def fake_trial(config, d, n, seed, memory_builder=None):
    risks = {m: 1.0 / n for m in theory.MODELS}
    risks["least_squares"] = 0.0
    return risks, 1
  monkeypatch.setattr(theory, "run_trial", fake_trial)
  results = theory.run_sweep(theory.TheoryConfig(dims=(2,), ns=(64, 256), seeds=1))
  assert results["slopes"]["least_squares"]["2"] is None
  assert results["slopes"]["resmem"]["2"] == pytest.approx(-1.0)
