"""Training loop: schedules, losses, learning, restore, multi-device equality, kill + resume."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from conftest import REPO_ROOT, run_python
from resmem_jax import train
import train_fakes


def _train_cfg(**kw):
  cfg = {"learning_rate": 0.4, "warmup_epochs": 1.0, "schedule": "cosine",
         "step_boundaries": (0.5, 0.75), "step_factor": 0.1}
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


def test_warmup_cosine_schedule_matches_formula():
  schedule = train.make_schedule(_train_cfg(), steps_per_epoch=10, total_steps=50)
  for step in [0, 5, 10, 20, 35, 50]:
    if step < 10:
      expected = 0.4 * step / 10
    else:
      expected = 0.4 * 0.5 * (1 + np.cos(np.pi * (step - 10) / 40))
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-7)


def test_step_schedule_drops_at_boundaries():
  schedule = train.make_schedule(_train_cfg(schedule="step", warmup_epochs=0.0), 10, 100)
  values = [float(schedule(s)) for s in (0, 49, 50, 74, 75, 99)]
  np.testing.assert_allclose(values, [0.4, 0.4, 0.04, 0.04, 0.004, 0.004], rtol=1e-5)
  with pytest.raises(ValueError, match="train.schedule"):
    train.make_schedule(_train_cfg(schedule="linear"), 10, 100)


def test_cross_entropy_and_masked_sums_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32)
  labels = rng.integers(0, 5, 6).astype(np.int32)
  mask = np.array([1, 1, 0, 1, 0, 1], bool)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -log_p[np.arange(6), labels]
  np.testing.assert_allclose(train.cross_entropy(logits, labels), ce, rtol=1e-5)
  sums = train.loss_sums("classification", logits, {"label": labels, "mask": mask})
  np.testing.assert_allclose(float(sums["loss"]), ce[mask].sum(), rtol=1e-5)
  assert float(sums["count"]) == 4
  assert float(sums["correct"]) == np.sum((logits.argmax(-1) == labels) & mask)
  smooth = train.cross_entropy(logits, labels, label_smoothing=0.1)
  expected = -(0.9 * log_p[np.arange(6), labels] + 0.1 * log_p.mean(-1))
  np.testing.assert_allclose(smooth, expected, rtol=1e-5)


def test_lm_loss_is_masked_token_cross_entropy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 3)).astype(np.int32)
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.int32)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  sums = train.loss_sums("lm", logits, {"targets": targets, "mask": mask})
  np.testing.assert_allclose(float(sums["loss"]), (ce * mask).sum(), rtol=1e-5)
  assert float(sums["count"]) == 3


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizers_build_and_reject_unknown(name):
  tx = train.make_optimizer(_train_cfg(optimizer=name, weight_decay=1e-4, momentum=0.9), 10, 20)
  params = {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)}
  updates, _ = tx.update(jax.tree_util.tree_map(np.zeros_like, params), tx.init(params), params)
  # Zero gradient: only weight decay moves the kernel; the bias is not decayed.
  np.testing.assert_array_equal(updates["bias"], 0.0)
  with pytest.raises(ValueError, match="train.optimizer"):
    train.make_optimizer(_train_cfg(optimizer="lamb"), 10, 20)


def _fake_config(model="cnn"):
  from experiments.configs import digits
  cfg = digits.get_config("tiny")
  cfg.model.name = model
  cfg.model.width = 4 if model == "cnn" else 16
  cfg.model.depth = 1 if model == "cnn" else 2
  cfg.model.embed_dim = 16
  cfg.train.num_steps = 24
  cfg.train.batch_size = 16
  cfg.train.learning_rate = 0.05
  cfg.train.eval_every_steps = 8
  cfg.train.log_every_steps = 4
  cfg.train.checkpoint_every_steps = 8
  return cfg


def test_training_learns_and_restores(tmp_path, monkeypatch):
  monkeypatch.setattr(train, "_data_module", lambda: train_fakes)
  cfg = _fake_config("cnn")
  final = train.train_and_evaluate(cfg, tmp_path)
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["train_loss"] for r in records if "train_loss" in r and not r.get("final")]
  assert losses[-1] < 0.5 * losses[0]
  assert final["validation_accuracy"] > 0.9 and final["test_accuracy"] > 0.9
  assert (tmp_path / "tensorboard").is_dir() and any((tmp_path / "tensorboard").iterdir())

  module, variables, step = train.restore_model(cfg, tmp_path)
  assert step == 24
  images, labels = train_fakes._split("test")
  logits, embedding = module.apply(variables, images, train=False)
  np.testing.assert_allclose(np.mean(np.argmax(logits, -1) == labels), final["test_accuracy"])
  assert embedding.shape == (len(labels), 16)
  # A finished run returns its recorded result without training again.
  assert train.train_and_evaluate(cfg, tmp_path) == final


def test_lm_task_trains_the_transformer(tmp_path, monkeypatch):
  pytest.importorskip("resmem_jax.models.transformer")
  monkeypatch.setattr(train, "_data_module", lambda: train_fakes.TokenSource)
  cfg = _fake_config()
  cfg.task = "lm"
  cfg.model = ml_collections.ConfigDict(
      {"name": "transformer", "width": 16, "depth": 1, "num_heads": 2, "max_len": 8})
  cfg.train.optimizer, cfg.train.learning_rate, cfg.train.num_steps = "adam", 0.01, 30
  cfg.train.log_every_steps = 10
  final = train.train_and_evaluate(cfg, tmp_path)
  losses = _train_losses(tmp_path)
  assert losses[-1] < 0.5 * losses[0]
  assert final["test_accuracy"] > 0.8  # the next token is a function of the current one


def test_restore_model_without_checkpoint_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="checkpoints"):
    train.restore_model(_fake_config(), tmp_path)


def test_bad_config_raises(tmp_path):
  cfg = _fake_config()
  cfg.task = "regression"
  with pytest.raises(ValueError, match="config.task"):
    train.train_and_evaluate(cfg, tmp_path)


_DEVICE_RUN = """
import json, sys
sys.path.insert(0, "tests")
import jax, train_fakes, test_train
from resmem_jax import train
train._data_module = lambda: train_fakes
cfg = test_train._fake_config("cifar_resnet")
cfg.model.depth, cfg.model.width, cfg.train.num_steps = 8, 0.25, 8
cfg.train.log_every_steps = 1
train.train_and_evaluate(cfg, sys.argv[1] if len(sys.argv) > 1 else {workdir!r})
print("DEVICES", jax.device_count())
"""


def _train_losses(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  return np.array([r["train_loss"] for r in records if "train_loss" in r and not r.get("final")])


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
          "--config=experiments/configs/digits.py:tiny", f"--workdir={workdir}",
          "--config.train.num_epochs=8", "--config.train.log_every_steps=1",
          "--config.train.checkpoint_every_steps=25"]


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  env.pop("XLA_FLAGS", None)
  return env


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
  from experiments.configs import digits
  cfg = digits.get_config("tiny")
  _, full_vars, full_step = train.restore_model(cfg, full)
  _, killed_vars, killed_step = train.restore_model(cfg, killed)
  assert full_step == killed_step == total
  for a, b in zip(jax.tree_util.tree_leaves(full_vars), jax.tree_util.tree_leaves(killed_vars)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  full_records = (full / "metrics.jsonl").read_text().splitlines()
  killed_records = (killed / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l) for l in killed_records] == [json.loads(l) for l in full_records]


class _CountingSizes(dict):
  def __init__(self, **sizes):
    super().__init__(**sizes)
    self.asked = []

  def __getitem__(self, split):
    self.asked.append(split)
    return super().__getitem__(split)


def test_training_split_is_counted_only_when_epochs_matter():
  from experiments.configs import digits
  cfg = digits.get_config("tiny")
  cfg.train.batch_size = 10
  cfg.train.num_steps, cfg.train.warmup_epochs, cfg.train.eval_every_steps = 7, 0.0, 5
  sizes = _CountingSizes(train=95)
  assert train._schedule_lengths(cfg, sizes) == (0, 7) and sizes.asked == []
  cfg.train.eval_every_steps = 0  # "once per epoch" needs the epoch length
  assert train._schedule_lengths(cfg, sizes) == (9, 7) and sizes.asked == ["train"]
  cfg.train.num_steps, cfg.train.num_epochs = -1, 2.0
  assert train._schedule_lengths(cfg, sizes) == (9, 18)


def test_text_split_sizes_are_counted_lazily(monkeypatch):
  from resmem_jax.data import text
  counted = []
  monkeypatch.setattr(text, "num_examples", lambda cfg, split: counted.append(split) or 3)
  monkeypatch.setattr(text, "vocabulary", lambda cfg: text.CharVocabulary("ab"))
  cfg = {"name": "tiny_shakespeare", "seq_len": 8}
  info = text.dataset_info(cfg)
  assert counted == []  # nothing read yet
  assert info.split_sizes["validation"] == 3 and info.split_sizes["validation"] == 3
  assert counted == ["validation"]  # counted once, only the split asked for
  assert dict(info.split_sizes) == {s: 3 for s in text.SPLITS}
