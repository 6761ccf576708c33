"""Training: schedules, losses, learning, restore, multi-device equality, kill + resume."""
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, run_python
from resmem_jax import settings as settings_lib
from resmem_jax import training
from resmem_jax.settings import ModelSettings, TrainSettings
from resmem_jax.training import optimizer
from resmem_jax.training import provenance
from resmem_jax.training import steps
from resmem_jax.training.loop import TrainingDiverged
import train_fakes


def _schedule_settings(**kw):
  return TrainSettings(**{"learning_rate": 0.4, "warmup_epochs": 1.0, "schedule": "cosine",
                          "step_boundaries": (0.5, 0.75), "step_factor": 0.1, **kw})


def test_warmup_cosine_schedule_matches_formula():
  schedule = optimizer.make_schedule(_schedule_settings(), steps_per_epoch=10, total_steps=50)
  for step in [0, 5, 10, 20, 35, 50]:
    if step < 10:
      expected = 0.4 * step / 10
    else:
      expected = 0.4 * 0.5 * (1 + np.cos(np.pi * (step - 10) / 40))
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-7)


def test_step_schedule_drops_at_boundaries():
  schedule = optimizer.make_schedule(_schedule_settings(schedule="step", warmup_epochs=0.0),
                                     10, 100)
  values = [float(schedule(s)) for s in (0, 49, 50, 74, 75, 99)]
  np.testing.assert_allclose(values, [0.4, 0.4, 0.04, 0.04, 0.004, 0.004], rtol=1e-5)
  with pytest.raises(ValueError, match="train.schedule"):
    optimizer.make_schedule(_schedule_settings(schedule="linear"), 10, 100)


def test_cross_entropy_and_masked_sums_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32)
  labels = rng.integers(0, 5, 6).astype(np.int32)
  mask = np.array([1, 1, 0, 1, 0, 1], bool)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -log_p[np.arange(6), labels]
  np.testing.assert_allclose(steps.cross_entropy(logits, labels), ce, rtol=1e-5)
  sums = steps.loss_sums(logits, {"labels": labels, "mask": mask})
  np.testing.assert_allclose(float(sums["loss"]), ce[mask].sum(), rtol=1e-5)
  assert float(sums["count"]) == 4
  assert float(sums["correct"]) == np.sum((logits.argmax(-1) == labels) & mask)
  unmasked = steps.loss_sums(logits, {"labels": labels})  # no mask: every position counts
  np.testing.assert_allclose(float(unmasked["loss"]), ce.sum(), rtol=1e-5)
  assert float(unmasked["count"]) == 6
  smooth = steps.cross_entropy(logits, labels, label_smoothing=0.1)
  expected = -(0.9 * log_p[np.arange(6), labels] + 0.1 * log_p.mean(-1))
  np.testing.assert_allclose(smooth, expected, rtol=1e-5)


def test_token_loss_is_masked_cross_entropy_over_positions():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  labels = rng.integers(0, 7, (2, 3)).astype(np.int32)
  mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(log_p, labels[..., None], -1)[..., 0]
  sums = steps.loss_sums(logits, {"labels": labels, "mask": mask})
  np.testing.assert_allclose(float(sums["loss"]), (ce * mask).sum(), rtol=1e-5)
  assert float(sums["count"]) == 3


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizers_build_and_reject_unknown(name):
  train = _schedule_settings(optimizer=name, weight_decay=1e-4, momentum=0.9)
  tx = optimizer.make_optimizer(train, optimizer.make_schedule(train, 10, 20))
  params = {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)}
  updates, _ = tx.update(jax.tree_util.tree_map(np.zeros_like, params), tx.init(params), params)
  # Zero gradient: only weight decay moves the kernel; the bias is not decayed.
  np.testing.assert_array_equal(updates["bias"], 0.0)
  with pytest.raises(ValueError, match="train.optimizer"):
    optimizer.make_optimizer(_schedule_settings(optimizer="lamb"),
                             optimizer.make_schedule(train, 10, 20))


def _settings(model="cnn", **train):
  """(ModelSettings, TrainSettings) of a 24-step run on the fake images."""
  if model == "cnn":
    model_settings = ModelSettings(name="cnn", width=4, depth=1, embed_dim=16)
  else:
    model_settings = ModelSettings(name=model, width=16, depth=2, embed_dim=16)
  train_settings = TrainSettings(**{
      "num_steps": 24, "batch_size": 16, "eval_batch_size": 256, "learning_rate": 0.05,
      "weight_decay": 1e-4, "eval_every_steps": 8, "log_every_steps": 4,
      "checkpoint_every_steps": 8, **train})
  return model_settings, train_settings


def _records(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def _train_losses(workdir):
  return np.array([r["train_loss"] for r in _records(workdir)
                   if "train_loss" in r and not r.get("final")])


def test_training_learns_and_restores(tmp_path):
  data = train_fakes.ImageFake()
  model, train = _settings("cnn")
  final = training.train_and_evaluate(data, model, train, 0, tmp_path).metrics
  losses = _train_losses(tmp_path)
  assert losses[-1] < 0.5 * losses[0]
  assert final["validation_accuracy"] > 0.9 and final["test_accuracy"] > 0.9
  assert (tmp_path / "tensorboard").is_dir() and any((tmp_path / "tensorboard").iterdir())
  # The logged learning rate is the rate the optimiser applied at that step.
  schedule = optimizer.make_schedule(
      train, *optimizer.schedule_lengths(train, data.info.split_sizes))
  logged = [(r["step"], r["learning_rate"]) for r in _records(tmp_path) if "learning_rate" in r]
  assert [s for s, _ in logged] == [4, 8, 12, 16, 20, 24]
  np.testing.assert_allclose([lr for _, lr in logged], [float(schedule(s - 1)) for s, _ in logged],
                             rtol=1e-6)
  info = json.loads((tmp_path / "model_info.json").read_text())
  assert info["num_classes"] == 4 and info["input_shape"] == [4, 4, 1]

  module, variables, step = training.restore_model(tmp_path, model)
  assert step == 24
  images, labels = data.examples("test")
  logits, embedding = module.apply(variables, images, train=False)
  np.testing.assert_allclose(np.mean(np.argmax(logits, -1) == labels), final["test_accuracy"])
  assert embedding.shape == (len(labels), 16)
  # A finished run returns its recorded result without training again (and no state).
  before = (tmp_path / "metrics.jsonl").read_text()
  again = training.train_and_evaluate(data, model, train, 0, tmp_path)
  assert again.metrics == final and again.state is None
  assert (tmp_path / "metrics.jsonl").read_text() == before


def test_train_model_returns_the_state_it_trained_bit_for_bit(tmp_path):
  # The model comes from memory, not read back from disk, and must equal the last checkpoint
  # exactly: the digest (and so the memory and results keyed by it) is the same either way.
  model, train = _settings("cnn", num_steps=6, log_every_steps=3, checkpoint_every_steps=4,
                           eval_every_steps=6)
  settings = settings_lib.Settings(model=model, train=train)
  trained = training.train_model(settings, train_fakes.ImageFake(), tmp_path, progress=False)
  _, restored, step = training.restore_model(tmp_path, model)
  assert trained.step == step == 6
  leaves = jax.tree_util.tree_leaves_with_path
  assert [p for p, _ in leaves(trained.variables)] == [p for p, _ in leaves(restored)]
  for (path, mine), (_, disk) in zip(leaves(trained.variables), leaves(restored)):
    assert isinstance(mine, np.ndarray), path  # host arrays, as TrainedModel promises
    assert mine.dtype == disk.dtype and mine.shape == disk.shape, path
    assert mine.tobytes() == np.asarray(disk).tobytes(), path
  assert trained.digest == provenance.variables_digest(restored)
  record = json.loads((tmp_path / provenance.RUN_FILE).read_text())
  assert record["checkpoint"] == {"step": 6, "digest": trained.digest}
  assert record["checkpoints"]["6"] == trained.digest and "4" in record["checkpoints"]
  # Rerun on the finished workdir: restored from the checkpoint, the same model and metrics.
  again = training.train_model(settings, train_fakes.ImageFake(), tmp_path, progress=False)
  assert (again.digest, again.step, again.metrics) == (trained.digest, 6, trained.metrics)
  for mine, disk in zip(jax.tree_util.tree_leaves(trained.variables),
                        jax.tree_util.tree_leaves(again.variables)):
    assert mine.dtype == disk.dtype and mine.tobytes() == disk.tobytes()


def test_token_data_trains_the_transformer(tmp_path):
  model = ModelSettings(name="transformer", width=16, depth=1, num_heads=2, max_len=8)
  _, train = _settings(optimizer="adam", learning_rate=0.01, num_steps=30, log_every_steps=10)
  final = training.train_and_evaluate(train_fakes.TokenFake(), model, train, 0, tmp_path,
                                      progress=False).metrics
  losses = _train_losses(tmp_path)
  assert losses[-1] < 0.5 * losses[0]
  assert final["test_accuracy"] > 0.8  # the next token is a function of the current one


def test_restore_model_without_checkpoint_or_model_info_raises(tmp_path):
  model, train = _settings()
  with pytest.raises(FileNotFoundError, match="checkpoints"):
    training.restore_model(tmp_path, model)
  training.train_and_evaluate(train_fakes.ImageFake(), model,
                              dataclasses.replace(train, num_steps=2), 0, tmp_path)
  (tmp_path / "model_info.json").unlink()
  with pytest.raises(FileNotFoundError, match="model_info.json"):
    training.restore_model(tmp_path, model)


def test_bad_settings_raise(tmp_path):
  model, train = _settings()
  with pytest.raises(ValueError, match="train.batch_size"):
    training.train_and_evaluate(train_fakes.ImageFake(), model,
                                dataclasses.replace(train, batch_size=0), 0, tmp_path)
  with pytest.raises(ValueError, match="model.depth"):
    training.train_and_evaluate(train_fakes.ImageFake(), dataclasses.replace(model, depth=0),
                                train, 0, tmp_path)
  assert not (tmp_path / "checkpoints").exists()


_DEVICE_RUN = """
import dataclasses, sys
sys.path.insert(0, "tests")
import jax, train_fakes, test_train
from resmem_jax import training
model, train = test_train._settings("cifar_resnet", num_steps=8, log_every_steps=1)
model = dataclasses.replace(model, depth=8, width=0.25)
training.train_and_evaluate(train_fakes.ImageFake(), model, train, 0, {workdir!r})
print("DEVICES", jax.device_count())
"""


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_trajectory(tmp_path):
  # Batch norm statistics are over the global batch, so sharding must not change the numbers.
  one = run_python(_DEVICE_RUN.format(workdir=str(tmp_path / "one")), devices=1)
  eight = run_python(_DEVICE_RUN.format(workdir=str(tmp_path / "eight")), devices=8)
  assert "DEVICES 1" in one.stdout and "DEVICES 8" in eight.stdout
  losses_one, losses_eight = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "eight")
  assert len(losses_one) == 8
  np.testing.assert_allclose(losses_eight, losses_one, rtol=2e-4, atol=1e-5)


def _train_command(workdir):
  return [sys.executable, "-m", "experiments.train",
          "--config=digits:tiny", f"--workdir={workdir}",
          "--config.train.num_epochs=8", "--config.train.log_every_steps=1",
          "--config.train.checkpoint_every_steps=25"]


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  env.pop("XLA_FLAGS", None)
  return env


@pytest.mark.slow
def test_killed_run_resumes_and_matches_uninterrupted(tmp_path):
  full, killed = tmp_path / "full", tmp_path / "killed"
  subprocess.run(_train_command(full), env=_env(), cwd=REPO_ROOT, check=True,
                 capture_output=True, timeout=300)
  total = max(int(p.name) for p in (full / "checkpoints").iterdir() if p.name.isdigit())

  proc = subprocess.Popen(_train_command(killed), env=_env(), cwd=REPO_ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir, deadline = killed / "checkpoints", time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()]
  assert saved and max(saved) < total, f"the run was not killed mid-way (saved {saved})"

  subprocess.run(_train_command(killed), env=_env(), cwd=REPO_ROOT, check=True,
                 capture_output=True, timeout=300)
  from resmem_jax.configs import digits
  settings = settings_lib.from_config(digits.get_config("tiny"))
  _, full_vars, full_step = training.restore_model(full, settings.model, settings.train.dtype)
  _, killed_vars, killed_step = training.restore_model(killed, settings.model,
                                                       settings.train.dtype)
  assert full_step == killed_step == total
  for a, b in zip(jax.tree_util.tree_leaves(full_vars), jax.tree_util.tree_leaves(killed_vars)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert _records(killed) == _records(full)


class _CountingSizes(dict):
  def __init__(self, **sizes):
    super().__init__(**sizes)
    self.asked = []

  def __getitem__(self, split):
    self.asked.append(split)
    return super().__getitem__(split)


def test_training_split_is_counted_only_when_epochs_matter():
  train = TrainSettings(batch_size=10, num_steps=7, warmup_epochs=0.0, eval_every_steps=5)
  sizes = _CountingSizes(train=95)
  assert optimizer.schedule_lengths(train, sizes) == (0, 7) and sizes.asked == []
  train = dataclasses.replace(train, eval_every_steps=0)  # "once per epoch" needs the epoch length
  assert optimizer.schedule_lengths(train, sizes) == (9, 7) and sizes.asked == ["train"]
  train = dataclasses.replace(train, num_steps=-1, num_epochs=2.0)
  assert optimizer.schedule_lengths(train, sizes) == (9, 18)


class _PoisonedFake(train_fakes.ImageFake):
  """ImageFake whose training inputs turn NaN from step ``bad_step`` (1-based) on: the loss and,
  after that update, the parameters become NaN, as in a run that diverges."""

  def __init__(self, bad_step):
    super().__init__()
    self.bad_step = bad_step

  def train_batches(self, global_batch_size, seed, start_step=0):
    for step, batch in enumerate(super().train_batches(global_batch_size, seed, start_step),
                                 start_step + 1):
      if step >= self.bad_step:
        batch = dict(batch, inputs=np.full_like(batch["inputs"], np.nan))
      yield batch


def _checkpoint_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_a_diverging_run_stops_at_the_logged_step_and_keeps_its_finite_checkpoint(tmp_path):
  model, train = _settings(num_steps=12, log_every_steps=1, checkpoint_every_steps=2,
                           eval_every_steps=100)
  with pytest.raises(TrainingDiverged,
                     match=r"training diverged: the train loss is nan at step 3; set a smaller "
                           r"train.learning_rate \(now 0.05\); the checkpoint of step 2"):
    training.train_and_evaluate(_PoisonedFake(3), model, train, 0, tmp_path)
  assert _checkpoint_steps(tmp_path) == [2]
  _, variables, step = training.restore_model(tmp_path, model)
  assert step == 2 and all(np.all(np.isfinite(np.asarray(leaf)))
                           for leaf in jax.tree_util.tree_leaves(variables))


def test_a_checkpoint_between_logging_points_is_not_replaced_by_a_diverged_state(tmp_path):
  # Logged every 10 steps, checkpointed every 2: the NaN of step 3 is caught at the step-4
  # checkpoint, which is not written.
  model, train = _settings(num_steps=12, log_every_steps=10, checkpoint_every_steps=2,
                           eval_every_steps=100, dtype="bfloat16")
  with pytest.raises(TrainingDiverged,
                     match=r"NaN or inf at step 4; .*train.dtype=float32 \(now bfloat16\); the "
                           r"checkpoint of step 2 \(finite\) is kept"):
    training.train_and_evaluate(_PoisonedFake(3), model, train, 0, tmp_path)
  assert _checkpoint_steps(tmp_path) == [2]


def test_a_huge_learning_rate_stops_with_one_line_naming_the_step(tmp_path):
  model, train = _settings(num_steps=8, log_every_steps=2, learning_rate=1e30)
  with pytest.raises(TrainingDiverged, match=r"at step [12]; set a smaller "
                     r"train.learning_rate \(now 1e\+30\); no checkpoint was written") as err:
    training.train_and_evaluate(train_fakes.ImageFake(), model, train, 0, tmp_path)
  assert "\n" not in str(err.value)
  assert not (tmp_path / "checkpoints").exists() or not _checkpoint_steps(tmp_path)


def test_models_and_batches_that_cannot_fit_are_refused_before_any_allocation(tmp_path):
  model, train = _settings()
  with pytest.raises(ValueError, match=r"model.width=1e\+09.* parameters, x 4 bytes x 3 "
                                       r"\(parameters, gradients, 1 optimizer slot\) = .* GB"):
    training.train_and_evaluate(train_fakes.ImageFake(), dataclasses.replace(model, width=1e9),
                                train, 0, tmp_path)
  with pytest.raises(ValueError, match=r"train.eval_batch_size=1,000,000,000,000 cannot fit: "
                                       r".* x \(4, 4, 1\) x 4 bytes"):
    training.train_and_evaluate(train_fakes.ImageFake(), model,
                                dataclasses.replace(train, eval_batch_size=10**12), 0, tmp_path)
  assert not (tmp_path / "checkpoints").exists()
