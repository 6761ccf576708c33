"""Models: output shapes, parameter counts, batch-norm train/eval behaviour, a few train steps."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resmem_jax import mesh as mesh_lib
from resmem_jax import models
from resmem_jax.settings import ModelSettings
from resmem_jax.training import state as state_lib
from resmem_jax.training import steps


def _cfg(**kw):
  return ModelSettings(**kw)


def _init(module, shape, seed=0):
  x = jax.random.normal(jax.random.key(seed), shape)
  return x, state_lib.init_variables(module, x, jax.random.key(1))


def test_mlp_count_params_matches_layer_arithmetic():
  module = models.build_model(_cfg(name="mlp", width=32, depth=3), num_classes=10)
  _, variables = _init(module, (2, 8, 8, 1))
  expected = (64 * 32 + 32) + 2 * (32 * 32 + 32) + (32 * 10 + 10)
  assert models.count_params(variables["params"]) == expected
  assert models.count_params(variables) == expected  # the variables dict is accepted too


@pytest.mark.parametrize("depth,expected", [(18, 11_689_512), (50, 25_557_032)])
def test_imagenet_resnet_param_counts_match_published(depth, expected):
  # The torchvision / original-paper ResNet-18 and -50 with 1000 classes.
  module = models.build_model(_cfg(name="resnet", depth=depth, width=1.0), num_classes=1000)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                              train=False))
  assert models.count_params(shapes["params"]) == expected


def test_cifar_resnet_width_and_depth_scale_params():
  def count(depth, width):
    module = models.build_model(_cfg(name="cifar_resnet", depth=depth, width=width), 100)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    return models.count_params(shapes["params"])
  assert 0.26e6 < count(20, 1.0) < 0.29e6  # ResNet-20 is the "0.27M" network of He et al.
  assert count(32, 1.0) > count(20, 1.0) > count(8, 1.0)
  assert count(20, 2.0) > 3.5 * count(20, 1.0) / 1.2  # conv params grow ~ width^2


@pytest.mark.parametrize("cfg,shape,emb_dim", [
    (dict(name="mlp", width=16, depth=2), (4, 8, 8, 1), 16),
    (dict(name="cnn", width=4, depth=2, embed_dim=12), (4, 28, 28, 1), 12),
    (dict(name="cnn", width=4, depth=3, embed_dim=12), (4, 8, 8, 1), 12),
    (dict(name="cifar_resnet", width=0.25, depth=8), (4, 32, 32, 3), 16),
    (dict(name="resnet", width=0.0625, depth=18), (2, 64, 64, 3), 32),
    (dict(name="resnet", width=0.0625, depth=101), (2, 64, 64, 3), 128),
])
def test_models_return_logits_and_embedding(cfg, shape, emb_dim):
  module = models.build_model(_cfg(**cfg), num_classes=7)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)
  logits, embedding = jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, x)
  assert logits.shape == (shape[0], 7) and logits.dtype == jnp.float32
  assert embedding.shape == (shape[0], emb_dim)


def test_batch_norm_train_updates_stats_and_eval_uses_running_averages():
  module = models.build_model(_cfg(name="cifar_resnet", width=0.25, depth=8), num_classes=3)
  x, variables = _init(module, (8, 8, 8, 3))
  x = 3.0 * x + 1.0
  with pytest.raises(Exception):  # train mode must be told batch_stats is mutable
    jax.eval_shape(lambda v, x: module.apply(v, x, train=True), variables, x)
  train_apply = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))
  eval_apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
  (train_logits, _), updates = train_apply(variables, x)
  old = variables["batch_stats"]["stem_norm"]["mean"]
  new = updates["batch_stats"]["stem_norm"]["mean"]
  assert not np.allclose(old, new)
  eval_logits, _ = eval_apply(variables, x)
  assert not np.allclose(train_logits, eval_logits)
  # Eval mode is a pure function of the stored statistics: batch composition does not matter.
  single, _ = eval_apply(variables, x[:1])
  np.testing.assert_allclose(single, eval_logits[:1], rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  module = models.build_model(_cfg(name="cnn", width=4, depth=2), 5, dtype="bfloat16")
  x, variables = _init(module, (2, 8, 8, 1))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
  logits, embedding = module.apply(variables, x)
  assert logits.dtype == jnp.float32 and embedding.dtype == jnp.float32


@pytest.mark.parametrize("cfg,shape", [
    (dict(name="mlp", width=32, depth=2), (16, 8, 8, 1)),
    (dict(name="cnn", width=4, depth=2, embed_dim=16), (16, 8, 8, 1)),
    (dict(name="cifar_resnet", width=0.25, depth=8), (8, 8, 8, 3)),
    (dict(name="resnet", width=0.0625, depth=18), (8, 16, 16, 3)),
    (dict(name="transformer", width=16, depth=1, num_heads=2, max_len=8), (8, 6)),
])
def test_each_family_trains_a_few_steps(cfg, shape):
  module = models.build_model(_cfg(**cfg), num_classes=4)
  rng = np.random.default_rng(0)
  if cfg["name"] == "transformer":  # token ids in, a label per position
    batch = {"inputs": rng.integers(0, 4, shape).astype(np.int32),
             "labels": rng.integers(0, 4, shape).astype(np.int32)}
  else:
    batch = {"inputs": rng.normal(size=shape).astype(np.float32),
             "labels": rng.integers(0, 4, shape[0]).astype(np.int32)}
  tx = optax.adam(1e-2)
  state = state_lib.init_state(module, tx, batch["inputs"][:1], seed=0, mesh=mesh_lib.data_mesh())
  step = jax.jit(steps.make_train_step(module, tx, 0.0, jax.random.key(0)))
  losses = []
  for _ in range(5):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 5
  assert losses[-1] < 0.8 * losses[0]  # memorising one batch


def test_build_model_rejects_bad_settings():
  with pytest.raises(ValueError, match="model.name='vgg'.*valid names: mlp, cnn"):
    models.build_model(_cfg(name="vgg", width=1, depth=1), 10)
  with pytest.raises(ValueError, match="model.depth must be 6n\\+2"):
    models.build_model(_cfg(name="cifar_resnet", width=1, depth=21), 10)
  with pytest.raises(ValueError, match="model.depth"):
    models.build_model(_cfg(name="resnet", width=1, depth=19), 10)
  with pytest.raises(ValueError, match="model.width"):
    models.build_model(_cfg(name="mlp", width=16.5, depth=1), 10)  # not a whole number of units
  with pytest.raises(ValueError, match="model.conv_impl"):
    models.build_model(_cfg(name="cifar_resnet", width=1, depth=8, conv_impl="fft"), 10)
  with pytest.raises(ValueError, match="num_classes"):
    models.build_model(_cfg(name="mlp", width=8, depth=1), 0)
  with pytest.raises(ValueError, match="train.dtype"):
    models.build_model(_cfg(name="mlp", width=8, depth=1), 3, dtype="int8")


def test_check_settings_validates_without_building_and_suggests_names():
  for name in models.MODEL_NAMES:  # every model's defaults (with a valid depth) pass
    depth = {"cifar_resnet": 20, "resnet": 18}.get(name, 2)
    models.check_settings(_cfg(name=name, width=1.0 if "resnet" in name else 32.0, depth=depth))
  with pytest.raises(ValueError, match="did you mean 'cifar_resnet'"):
    models.check_settings(_cfg(name="cifar_resnt"))
  with pytest.raises(ValueError, match="model.embed_dim"):
    models.check_settings(_cfg(name="cnn", embed_dim=0))
  with pytest.raises(ValueError, match="model.num_heads"):
    models.check_settings(_cfg(name="transformer", width=30, num_heads=4))
  with pytest.raises(ValueError, match="model.max_len"):
    models.check_settings(_cfg(name="transformer", width=32, max_len=0))


def test_transformer_is_built_from_the_registry():
  cfg = _cfg(name="transformer", width=16, depth=1, num_heads=2)
  module = models.build_model(cfg, num_classes=11)
  assert isinstance(module, models.TransformerLM) and module.vocab_size == 11
  # The compute dtype reaches the transformer like every other model (from train.dtype).
  assert models.build_model(cfg, num_classes=11, dtype="bfloat16").dtype == jnp.bfloat16
  assert module.dtype == jnp.float32
  with pytest.raises(ValueError, match="vocabulary size"):
    models.build_model(cfg, num_classes=1)


@pytest.mark.parametrize("strides,padding,kernel", [(1, 1, 3), (2, 1, 3), (2, 0, 1), (2, 3, 7)])
def test_im2col_conv_matches_xla_convolution(strides, padding, kernel):
  from resmem_jax.models.resnet import im2col_conv
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 11, 11, 3)).astype(np.float32)
  w = rng.normal(size=(kernel, kernel, 3, 5)).astype(np.float32)
  expected = jax.lax.conv_general_dilated(x, w, (strides, strides), [(padding, padding)] * 2,
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(im2col_conv(x, w, strides, padding), expected, rtol=1e-4, atol=1e-4)


def test_resnet_conv_impls_share_parameters_and_outputs():
  xla = models.build_model(_cfg(name="cifar_resnet", width=0.25, depth=8, conv_impl="xla"), 3)
  im2col = models.build_model(_cfg(name="cifar_resnet", width=0.25, depth=8, conv_impl="im2col"), 3)
  x, variables = _init(xla, (2, 8, 8, 3))
  a, _ = jax.jit(lambda v, x: xla.apply(v, x))(variables, x)
  b, _ = jax.jit(lambda v, x: im2col.apply(v, x))(variables, x)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
