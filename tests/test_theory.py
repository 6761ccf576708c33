"""Tests for resmem_jax/jobs/theory.py and experiments/linear_regression.py (stylized linear regression)."""
import dataclasses
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from conftest import REPO_ROOT, run_python
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


def test_neighbours_for_linear_residual_rule():
  assert theory.neighbours_for("linear_residual", 4096, 1) == 512  # 4096^(3/4)
  assert theory.neighbours_for("linear_residual", 4096, 3) == 64  # 4096^(1/2)
  assert theory.neighbours_for("linear_residual", 65536, 8) == math.ceil(65536 ** (3 / 11))
  assert theory.neighbours_for("linear_residual", 4096, 3, k_scale=2.0) == 128
  # More neighbours than "grow" (the linear residual's bias falls faster), fewer than n.
  for d in (1, 2, 4, 8):
    grow = theory.neighbours_for("grow", 65536, d)
    assert grow < theory.neighbours_for("linear_residual", 65536, d) < 65536
  assert theory.k_exponent("linear_residual", 2) == pytest.approx(0.6)
  assert theory.k_exponent("grow", 2) == pytest.approx(0.5)
  assert theory.k_exponent("7", 2) == 0.0
  with pytest.raises(ValueError, match="linear_residual"):  # the message lists the known rules
    theory.k_exponent("linear", 2)


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


def _per_seed_risks(ns, slopes_per_seed, rng, noise=0.05):
  ns = np.asarray(ns, np.float64)
  return np.array([np.exp(rng.normal(0, 1) + s * np.log(ns) + noise * rng.standard_normal(ns.size))
                   for s in slopes_per_seed])


def test_slope_interval_matches_scipy():
  rng = np.random.default_rng(11)
  ns = [64, 128, 256, 512, 1024, 2048]
  risks = _per_seed_risks(ns, [-0.52, -0.47, -0.55, -0.49, -0.5], rng)
  fit = theory.slope_interval(ns, risks)
  # Reference: scipy's regression per seed, then scipy's t interval around the mean.
  per_seed = np.array([stats.linregress(np.log(ns), np.log(r)).slope for r in risks])
  low, high = stats.t.interval(0.95, df=len(per_seed) - 1, loc=per_seed.mean(),
                               scale=stats.sem(per_seed))
  np.testing.assert_allclose(fit["per_seed"], per_seed, rtol=1e-10)
  assert fit["slope"] == pytest.approx(per_seed.mean(), rel=1e-12)
  np.testing.assert_allclose(fit["ci95"], [low, high], rtol=1e-10)
  assert fit["half_width"] == pytest.approx((high - low) / 2, rel=1e-10)
  assert fit["ns"] == ns
  # Two seeds: 1 degree of freedom, t = 12.71.
  two = theory.slope_interval(ns, risks[:2])
  spread = abs(per_seed[0] - per_seed[1]) / 2  # sem of two values
  assert two["half_width"] == pytest.approx(12.7062 * spread, rel=1e-4)


def test_slope_interval_exact_power_law_and_zero_risk():
  ns = [100, 1000, 10000]
  risks = np.array([[c * n ** -0.4 for n in ns] for c in (1.0, 2.0, 5.0)])
  fit = theory.slope_interval(ns, risks)
  assert fit["slope"] == pytest.approx(-0.4, abs=1e-12)
  assert fit["half_width"] == pytest.approx(0.0, abs=1e-10)
  assert theory.slope_interval(ns, risks, zero_risk=0.1)["slope"] is None  # below the floor
  risks[1, 2] = 0.0  # an exact fit: no log-log slope
  assert theory.slope_interval(ns, risks)["slope"] is None


def test_local_slopes_are_two_point_slopes():
  rng = np.random.default_rng(5)
  ns = [64, 128, 256, 512]
  risks = _per_seed_risks(ns, [-1.0, -0.8, -0.9], rng, noise=0.2)
  local = theory.local_slopes(ns, risks)
  assert [f["ns"] for f in local] == [[64, 128], [128, 256], [256, 512]]
  for j, f in enumerate(local):
    two_point = np.log(risks[:, j + 1] / risks[:, j]) / np.log(2.0)
    np.testing.assert_allclose(f["per_seed"], two_point, rtol=1e-10)
    low, high = stats.t.interval(0.95, df=2, loc=two_point.mean(), scale=stats.sem(two_point))
    np.testing.assert_allclose(f["ci95"], [low, high], rtol=1e-10)


def test_slope_interval_rejects_too_little_data():
  with pytest.raises(ValueError, match="seeds"):
    theory.slope_interval([64, 128], [[1.0, 0.5]])
  with pytest.raises(ValueError, match="values of n"):
    theory.slope_interval([64], [[1.0], [2.0]])
  with pytest.raises(ValueError, match=r"\[seeds, 3\]"):
    theory.slope_interval([64, 128, 256], [[1.0, 0.5], [2.0, 1.0]])


def test_slope_ns_and_config_validation():
  assert theory.slope_ns(theory.TheoryConfig(ns=(64, 256, 1024, 4096, 16384, 65536))) == [
      4096, 16384, 65536]
  assert theory.slope_ns(theory.TheoryConfig(ns=(64, 256, 1024), slope_min_n=256)) == [256, 1024]
  defaults = theory.TheoryConfig().validate()
  assert defaults.seeds >= 5 and len(defaults.ns) >= 10
  assert all(b == 2 * a for a, b in zip(defaults.ns, defaults.ns[1:]))  # geometric, ratio 2
  for bad, word in [(dict(domain="torus"), "domain"), (dict(ns=(256, 64)), "ns"),
                    (dict(noise_std=-1.0), "noise_std"), (dict(sigma=0.0), "sigma"),
                    (dict(k_rule="lots"), "k_rule"), (dict(risk_target="train"), "risk_target"),
                    (dict(dims=(0,)), "dims"), (dict(seeds=1), "seeds must be >= 2"),
                    (dict(ns=(64,)), "at least 2"),
                    (dict(ns=(64, 128), slope_min_n=100), "slope_min_n")]:
    with pytest.raises(ValueError, match=word):
      theory.TheoryConfig(**bad).validate()


def test_predicted_slopes():
  cube = theory.TheoryConfig()
  for d in (1, 2, 4, 8):
    predicted = theory.predicted_slopes(cube, d)
    # Noise term n^(-2/(2+d)) is the slowest; 1-NN's noise term does not fall.
    assert predicted["resmem"] == pytest.approx(-2 / (2 + d))
    assert predicted["knn"] == pytest.approx(-2 / (2 + d))
    assert predicted["base"] == 0.0 and predicted["resmem_k1"] == pytest.approx(0.0)
    assert predicted["least_squares"] == -1.0
    noiseless = theory.predicted_slopes(dataclasses.replace(cube, noise_std=0.0), d)
    assert noiseless["resmem"] == pytest.approx(-3 / (2 + d))  # boundary-layer bias
    assert noiseless["resmem_k1"] == pytest.approx(-2 / d)  # 1-NN spread
    assert noiseless["least_squares"] is None
    linear = theory.predicted_slopes(dataclasses.replace(cube, k_rule="linear_residual"), d)
    assert linear["resmem"] == pytest.approx(-3 / (3 + d))  # noise and bias balanced
  assert theory.risk_terms(2 / 3, 1) == pytest.approx(
      {"noise": -2 / 3, "bias": -1.0, "spread": -4 / 3})
  # Sphere S^3 (m = 3), k from "grow" with d = 4: noise -1/3, curvature bias -(2/3)(4/3).
  sphere = dataclasses.replace(cube, domain="sphere")
  assert theory.risk_terms(1 / 3, 4, "sphere")["bias"] == pytest.approx(-8 / 9)
  assert theory.predicted_slopes(sphere, 4)["resmem"] == pytest.approx(-1 / 3)
  assert theory.theory_rate(4, "sphere") == pytest.approx(-0.4)
  assert theory.predicted_slopes(dataclasses.replace(sphere, noise_std=0.0), 1)["resmem"] is None
  noisy_target = dataclasses.replace(cube, risk_target="noisy")
  assert set(theory.predicted_slopes(noisy_target, 2).values()) == {0.0}


def test_risk_splits_into_noise_and_smoothing_terms():
  # ResMem's error is mean(noise over N(x)) + <theta* - theta_b, xbar - x>; k-NN's has theta*.
  # Same seed, same inputs and theta*: only the label noise differs between the two configs.
  d, n, noise = 2, 1024, 0.3
  noiseless = theory.TheoryConfig(noise_std=0.0, test_size=2000, include_k1=False)
  noisy = dataclasses.replace(noiseless, noise_std=noise)
  excess = []
  for seed in range(3):
    clean, k = theory.run_trial(noiseless, d, n, seed)
    # Smoothing terms: ||theta*||^2 / ||theta* - theta_L||^2 = 1 / 0.5^2 = 4.
    assert clean["knn"] / clean["resmem"] == pytest.approx(4.0, rel=0.01)
    excess.append(theory.run_trial(noisy, d, n, seed)[0]["resmem"] - clean["resmem"])
  assert np.mean(excess) == pytest.approx(noise ** 2 / k, rel=0.2)


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
  slopes = {m: {d: fits["upper"]["slope"] for d, fits in by_d.items()}
            for m, by_d in results["slopes"].items()}
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
  assert results["noise_term"]["1"]["4096"] == pytest.approx(0.01 / 256)
  ks = [results["k"]["4"][str(n)] for n in (1024, 4096)]  # 11, 16: rounded up from n^(1/3)
  assert results["noise_term_slopes"]["4"]["upper"] == pytest.approx(
      -math.log(ks[1] / ks[0]) / math.log(4.0))
  assert len(results["noise_term_slopes"]["4"]["local"]) == 3
  resmem = results["slopes"]["resmem"]["1"]
  assert resmem["whole"]["ns"] == [64, 256, 1024, 4096] and resmem["upper"]["ns"] == [1024, 4096]
  assert [f["ns"] for f in resmem["local"]] == [[64, 256], [256, 1024], [1024, 4096]]
  for fit in [resmem["whole"], resmem["upper"]] + resmem["local"]:
    low, high = fit["ci95"]
    assert low < fit["slope"] < high and len(fit["per_seed"]) == 2
    assert fit["predicted_in_ci95"] == (low <= -2 / 3 <= high)
    assert fit["lipschitz_in_ci95"] == (low <= -2 / 3 <= high)
  assert "lipschitz_in_ci95" not in results["slopes"]["base"]["1"]["whole"]
  assert results["rates"]["4"]["lipschitz"] == pytest.approx(-1 / 3)
  assert results["rates"]["4"]["predicted"]["resmem"] == pytest.approx(-1 / 3)
  assert results["rates"]["4"]["linear_residual_tuned"] == pytest.approx(-3 / 7)


def test_binary_writes_results_and_plot(tmp_path):
  workdir = tmp_path / "theory"
  proc = run_python(
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
  assert results["rates"]["2"]["lipschitz"] == pytest.approx(-0.5)
  assert results["noise_term"] is None  # softmax weights: not noise_std^2 / k
  assert results["noise_term_slopes"] is None
  assert results["slope_ns"] == [64, 128, 256]  # fewer than 4 n: the upper range is the whole grid
  # The printed table: every model's whole and upper slope with its interval, as in results.json.
  out = proc.stdout
  for d in ("1", "2"):
    fits = results["slopes"]["resmem"][d]
    line = next(l for l in out.splitlines() if l.startswith("  resmem ") and
                theory.format_slope(fits["whole"]) in l)
    assert theory.format_slope(fits["upper"]) in line
    assert f"d={d}: Lipschitz rate" in out
  assert out.count("  local resmem ") == 2
  assert "local slopes run over consecutive pairs of n: 64-128, 128-256" in out
  png = pathlib.Path(workdir / results["plot"]).read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_zero_risk_model_gets_null_slope(monkeypatch):
  # Least squares without noise can fit exactly (risk 0.0): no log-log slope, and no crash.
  def fake_trial(config, d, n, seed, memory_builder=None):
    risks = {m: (1.0 + seed) / n for m in theory.MODELS}
    risks["least_squares"] = 1e-32 * seed  # exact up to float64 rounding
    return risks, 1
  monkeypatch.setattr(theory, "run_trial", fake_trial)
  results = theory.run_sweep(theory.TheoryConfig(dims=(2,), ns=(64, 256), seeds=2))
  least_squares = results["slopes"]["least_squares"]["2"]
  assert least_squares["whole"]["slope"] is None and least_squares["whole"]["ci95"] is None
  assert least_squares["whole"]["predicted_in_ci95"] is None
  assert results["slopes"]["resmem"]["2"]["whole"]["slope"] == pytest.approx(-1.0)


@pytest.mark.parametrize("flag,message", [
    ("--seeds=1", "seeds must be >= 2"), ("--k_rule=linear", "k_rule must be one of"),
    ("--ns=64", "ns must list at least 2"), ("--ns=64,x", "--ns must be a comma-separated")])
def test_binary_rejects_bad_flags_in_one_line(tmp_path, flag, message):
  proc = subprocess.run([sys.executable, "-m", "resmem_jax.cli.theory", f"--workdir={tmp_path}",
                         flag], capture_output=True, text=True, timeout=300, cwd=str(REPO_ROOT))
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("flag error: ") and message in lines[-1], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "results.json").exists()
