"""The one inference pass: every row (example or token) exactly once, on 1 and 8 devices."""
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_python
from resmem_jax import inference
from resmem_jax import mesh as mesh_lib
from resmem_jax.core import residuals


def _linear_apply(variables, inputs):
  """A stand-in model: logits = x W, embedding = x (rows per leading position)."""
  x = inputs.astype(jnp.float32)
  return x @ variables["w"], x


def _batches(n, batch, width, tokens=None):
  rng = np.random.default_rng(0)
  shape = (n,) if tokens is None else (n, tokens)
  x = rng.normal(size=shape + (width,)).astype(np.float32)
  y = rng.integers(0, 5, size=shape).astype(np.int32)
  out = []
  for start in range(0, n, batch):
    xb, yb = x[start:start + batch], y[start:start + batch]
    pad = batch - len(yb)
    mask = np.ones(yb.shape, bool)
    if tokens is not None and start == 0:
      mask[0, tokens - 2:] = False  # a padded tail inside a real sequence
    out.append({"inputs": np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], np.float32)]),
                "labels": np.concatenate([yb, np.zeros((pad,) + yb.shape[1:], np.int32)]),
                "mask": np.concatenate([mask, np.zeros((pad,) + yb.shape[1:], bool)])})
  return x, y, out


@pytest.mark.parametrize("tokens", [None, 6])
@pytest.mark.parametrize("fmt", ["dense", "bfloat16", "sparse"])
def test_rows_are_the_masked_positions_with_residuals_in_store_format(tokens, fmt):
  x, y, batches = _batches(21, 8, 4, tokens)
  variables = {"w": np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)}
  mesh = mesh_lib.data_mesh()
  forward = inference.make_forward(_linear_apply, mesh, temperatures=(0.5, 2.0),
                                   residual_format=fmt, top_m=2)
  rows = inference.concatenate(list(inference.run_pass(forward, variables, batches, mesh,
                                                       progress=False)))
  keep = np.concatenate([b["mask"][:len(b["mask"])] for b in batches]).reshape(-1)
  flat_x = np.concatenate([b["inputs"] for b in batches]).reshape(-1, 4)[keep]
  flat_y = np.concatenate([b["labels"] for b in batches]).reshape(-1)[keep]
  expected_rows = 21 if tokens is None else 21 * 6 - 2
  assert rows.size == expected_rows
  np.testing.assert_allclose(rows.embeddings, flat_x, atol=1e-6)
  np.testing.assert_array_equal(rows.labels, flat_y)
  np.testing.assert_allclose(rows.logits, flat_x @ variables["w"], atol=1e-5)
  for t in (0.5, 2.0):
    dense = residuals.residuals(flat_y, flat_x @ variables["w"], t)
    arrays = rows.residuals[t]
    if fmt == "sparse":
      np.testing.assert_array_equal(arrays["sparse_columns"][:, 0], flat_y)
      np.testing.assert_allclose(arrays["sparse_values"],
                                 np.take_along_axis(dense, arrays["sparse_columns"], 1), atol=1e-5)
    else:
      np.testing.assert_allclose(np.asarray(arrays["residuals"], np.float32), dense,
                                 atol=1e-5 if fmt == "dense" else 4e-3)


def test_rechunk_regroups_without_losing_or_repeating_rows():
  parts = [inference.Rows(np.full((n, 2), i, np.float32), np.arange(n, dtype=np.int32) + 10 * i)
           for i, n in enumerate([3, 7, 1, 5])]
  chunks = list(inference.rechunk(iter(parts), 4))
  assert [c.size for c in chunks] == [4, 4, 4, 4]
  np.testing.assert_array_equal(np.concatenate([c.labels for c in chunks]),
                                np.concatenate([p.labels for p in parts]))
  limited = list(inference.rechunk(iter(parts), 4, limit=9))
  assert [c.size for c in limited] == [4, 4, 1]


def test_masked_rows_exactly_once_on_eight_devices():
  # 8 fake devices, a digits split that is not a multiple of the batch (or of 8), and token
  # batches with masked tails: the pass returns each row once, in order, equal to one device.
  code = r'''
import numpy as np, jax, jax.numpy as jnp
from resmem_jax import data, inference, mesh as mesh_lib, models, settings
assert jax.device_count() == 8
ds = data.get_dataset(settings.DataSettings(name="digits"))
module = models.build_model(settings.ModelSettings(name="mlp", width=16, depth=1), 10)
x0 = np.zeros((1,) + tuple(ds.info.input_shape), np.float32)
variables = module.init(jax.random.PRNGKey(0), x0, train=False)
apply = lambda v, x: module.apply(v, x, train=False)
n = ds.num_examples("test")
batch = 56  # multiple of 8 devices, not a divisor of n
assert n % batch != 0
outs = []
for devices in (jax.devices()[:1], jax.devices()):
  mesh = mesh_lib.data_mesh(devices)
  fwd = inference.make_forward(apply, mesh, temperatures=(1.0,), residual_format="sparse", top_m=3)
  outs.append(inference.concatenate(list(inference.run_pass(
      fwd, mesh_lib.replicate(variables, mesh), ds.eval_batches("test", batch), mesh,
      progress=False))))
assert outs[1].size == n, (outs[1].size, n)
images = np.concatenate([b["inputs"][b["mask"]] for b in ds.eval_batches("test", batch)])
ref_logits, ref_emb = module.apply(variables, images, train=False)
np.testing.assert_allclose(outs[1].logits, np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
np.testing.assert_allclose(outs[1].embeddings, np.asarray(ref_emb), rtol=1e-5, atol=1e-5)
np.testing.assert_array_equal(outs[0].labels, outs[1].labels)
np.testing.assert_array_equal(outs[0].residuals[1.0]["sparse_columns"],
                              outs[1].residuals[1.0]["sparse_columns"])

from resmem_jax.models import transformer
lm = transformer.build(settings.ModelSettings(name="transformer", width=16, depth=1, num_heads=2,
                                              max_len=8), 9, jnp.float32)
lm_vars = lm.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
rng = np.random.default_rng(0)
tokens = rng.integers(0, 9, size=(16, 9)).astype(np.int32)
mask = np.ones((16, 8), bool); mask[13:] = False; mask[12, 5:] = False
batch = {"inputs": tokens[:, :-1], "labels": tokens[:, 1:], "mask": mask}
token_outs = []
for devices in (jax.devices()[:1], jax.devices()):
  mesh = mesh_lib.data_mesh(devices)
  fwd = inference.make_forward(lambda v, x: lm.apply(v, x, train=False), mesh)
  token_outs.append(inference.concatenate(list(inference.run_pass(
      fwd, mesh_lib.replicate(lm_vars, mesh), iter([batch]), mesh, progress=False))))
assert token_outs[1].size == int(mask.sum()) == 12 * 8 + 5
np.testing.assert_array_equal(token_outs[1].labels, tokens[:, 1:][mask])
np.testing.assert_allclose(token_outs[0].embeddings, token_outs[1].embeddings, atol=1e-5)
np.testing.assert_allclose(token_outs[0].logits, token_outs[1].logits, atol=1e-5)
print("OK")
'''
  assert "OK" in run_python(code, devices=8).stdout
