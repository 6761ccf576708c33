"""The programs the tools run on a device lower for TPU and GPU (``jax.export``) on this CPU.

A first step of issue 22: the train and eval steps of every model family in float32 and
bfloat16, the inference (embedding) pass, and the `exact` and `approx` search programs, on the
tools' one-device data mesh. A program that cannot run on an accelerator (a host callback inside a step, say) fails
here before a user's first TPU run.
"""
import jax
import jax.numpy as jnp
import optax
import pytest
from jax import export

from conftest import run_python
from resmem_jax import inference
from resmem_jax import mesh as mesh_lib
from resmem_jax import models
from resmem_jax.memory import approx
from resmem_jax.memory import exact
from resmem_jax.settings import ModelSettings
from resmem_jax.training import state as state_lib
from resmem_jax.training import steps

PLATFORMS = ("tpu", "cuda")
# Each family at a size that lowers in well under a second; (settings, input shape, input dtype).
FAMILIES = {
    "mlp": (dict(name="mlp", width=16, depth=1), (4, 8, 8, 1), "float32"),
    "cnn": (dict(name="cnn", width=4), (4, 8, 8, 1), "float32"),
    "cifar_resnet": (dict(name="cifar_resnet", depth=8, width=0.25), (4, 16, 16, 3), "float32"),
    "resnet": (dict(name="resnet", depth=18, width=0.125), (4, 32, 32, 3), "float32"),
    "transformer": (dict(name="transformer", width=16, depth=1, num_heads=2, max_len=16), (4, 16),
                    "int32"),
}


def _abstract(family: str, dtype: str):
  """(module, abstract train state, abstract batch): shapes only, nothing computed."""
  cfg, shape, input_dtype = FAMILIES[family]
  module = models.build_model(ModelSettings(**cfg), num_classes=5, dtype=dtype)
  tx = optax.sgd(0.1, momentum=0.9)

  def init():
    variables = module.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                            jnp.zeros(shape, input_dtype), train=False)
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                                batch_stats=variables.get("batch_stats", {}),
                                opt_state=tx.init(variables["params"]))

  rows = shape[:2] if input_dtype == "int32" else shape[:1]  # tokens: a label per position
  batch = {"inputs": jax.ShapeDtypeStruct(shape, jnp.dtype(input_dtype)),
           "labels": jax.ShapeDtypeStruct(rows, jnp.int32),
           "mask": jax.ShapeDtypeStruct(rows, jnp.float32)}
  return module, tx, jax.eval_shape(init), batch


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_and_eval_steps_lower_for_tpu_and_cuda(family, dtype):
  module, tx, state, batch = _abstract(family, dtype)
  train_step = steps.make_train_step(module, tx, 0.0, jax.random.key(1))
  exported = export.export(jax.jit(train_step), platforms=PLATFORMS)(state, batch)
  assert exported.platforms == PLATFORMS
  # The lowered step returns the new state and the step's metrics, shaped as on CPU.
  expected = jax.tree.leaves(jax.eval_shape(train_step, state, batch))
  assert [(a.shape, a.dtype) for a in exported.out_avals] == [(a.shape, a.dtype) for a in expected]
  variables = {"params": state.params, **({"batch_stats": state.batch_stats}
                                           if state.batch_stats else {})}
  exported = export.export(jax.jit(steps.make_eval_step(module)), platforms=PLATFORMS)(
      variables, batch)
  assert exported.platforms == PLATFORMS


def test_a_host_callback_inside_a_step_fails_to_lower():
  # What these tests exist to catch: a step that calls back to Python cannot be exported.
  module, tx, state, batch = _abstract("mlp", "float32")
  train_step = steps.make_train_step(module, tx, 0.0, jax.random.key(1))

  def step_with_callback(state, batch):
    new_state, metrics = train_step(state, batch)
    loss = jax.pure_callback(lambda x: x, jax.ShapeDtypeStruct((), jnp.float32), metrics["loss"])
    return new_state, dict(metrics, loss=loss)

  with pytest.raises(Exception, match="(?i)callback|custom call"):
    export.export(jax.jit(step_with_callback), platforms=PLATFORMS)(state, batch)


def test_exact_and_approx_searches_lower_for_tpu_and_cuda():
  # The per-device search programs of the two on-device backends, on the tools' data mesh.
  mesh = mesh_lib.data_mesh()
  queries = jax.ShapeDtypeStruct((128, 10), jnp.float32)
  num_keys = jax.ShapeDtypeStruct((), jnp.int32)
  keys = jax.ShapeDtypeStruct((4096, 10), jnp.float32)
  exported = export.export(exact._make_search_fn(mesh, 18, 1024, 4096, 128),  # pylint: disable=protected-access
                           platforms=PLATFORMS)(queries, num_keys, keys)
  assert [a.shape for a in exported.out_avals] == [(128, 18), (128, 18)]
  exported = export.export(approx._make_search_fn(mesh, 18, 4096, 0.95),  # pylint: disable=protected-access
                           platforms=PLATFORMS)(queries, num_keys, keys)
  assert [a.shape for a in exported.out_avals] == [(128, 18), (128, 18)]
  # On TPU approx_min_k is the native partial reduction, kept as such in the lowered module.
  assert "ApproxTopK" in exported.mlir_module()


@pytest.mark.parametrize("residual_format", ["dense", "sparse"])
def test_the_inference_pass_lowers_for_tpu_and_cuda(residual_format):
  module, _, state, batch = _abstract("cnn", "float32")
  forward = inference.make_forward(lambda variables, x: module.apply(variables, x, train=False),
                                   mesh_lib.data_mesh(), temperatures=(1.0, 2.0),
                                   residual_format=residual_format, top_m=3)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  exported = export.export(forward.fn, platforms=PLATFORMS)(
      variables, batch["inputs"], batch["labels"])
  assert exported.platforms == PLATFORMS


def test_sharded_programs_lower_on_a_mesh_of_eight_devices():
  # The shardings the tools use: keys split along the data axis for the searches, batches split
  # for the train step and the inference pass, parameters replicated.
  proc = run_python("""
import jax, jax.numpy as jnp, optax
from jax import export
from jax.sharding import NamedSharding, PartitionSpec as P
from resmem_jax import inference, mesh as mesh_lib, models
from resmem_jax.memory import approx, exact
from resmem_jax.settings import ModelSettings
from resmem_jax.training import state as state_lib, steps
mesh = mesh_lib.data_mesh()
assert mesh.devices.size == 8
platforms = ("tpu", "cuda")
split = NamedSharding(mesh, P(mesh_lib.DATA_AXIS))
whole = NamedSharding(mesh, P())
queries = jax.ShapeDtypeStruct((128, 10), jnp.float32, sharding=whole)
num_keys = jax.ShapeDtypeStruct((), jnp.int32, sharding=whole)
keys = jax.ShapeDtypeStruct((8 * 512, 10), jnp.float32, sharding=split)
for name, fn in (("exact", exact._make_search_fn(mesh, 18, 512, 512, 128)),
                 ("approx", approx._make_search_fn(mesh, 18, 512, 0.95))):
  e = export.export(fn, platforms=platforms)(queries, num_keys, keys)
  assert e.nr_devices == 8 and [a.shape for a in e.out_avals] == [(128, 18)] * 2, name
module = models.build_model(ModelSettings(name="cnn", width=4), num_classes=5)
tx = optax.sgd(0.1, momentum=0.9)
def init():
  v = module.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                  jnp.zeros((8, 8, 8, 1)), train=False)
  return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                              batch_stats=v.get("batch_stats", {}), opt_state=tx.init(v["params"]))
state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=whole),
                     jax.eval_shape(init))
batch = {"inputs": jax.ShapeDtypeStruct((16, 8, 8, 1), jnp.float32, sharding=split),
         "labels": jax.ShapeDtypeStruct((16,), jnp.int32, sharding=split),
         "mask": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=split)}
e = export.export(jax.jit(steps.make_train_step(module, tx, 0.0, jax.random.key(1))),
                  platforms=platforms)(state, batch)
assert e.nr_devices == 8
forward = inference.make_forward(lambda v, x: module.apply(v, x, train=False), mesh,
                                 temperatures=(1.0,))
variables = {"params": state.params, "batch_stats": state.batch_stats}
e = export.export(forward.fn, platforms=platforms)(variables, batch["inputs"], batch["labels"])
assert e.nr_devices == 8
print("LOWERED ON 8")
""", devices=8)
  assert "LOWERED ON 8" in proc.stdout


@pytest.mark.slow  # a real fit and evaluate first: about 10 s
def test_the_selection_gate_and_prediction_programs_lower_for_tpu_and_cuda(monkeypatch):
  # The jitted pieces of the validation sweep, the gate's second pass and prediction, each
  # exported with the arguments a real (tiny) fit and evaluate give it.
  import flax.linen as nn
  import numpy as np
  import resmem_jax
  from resmem_jax import fitting
  from resmem_jax.core import gate
  from resmem_jax.core import selection

  recorded = {}
  for module, name in ((selection, "_score_chunk"), (selection, "_base_1_sums"),
                       (gate, "_score_rows"), (fitting, "_base_prediction"),
                       (fitting, "_probabilities"), (fitting, "_row_metrics")):
    def wrapper(*args, _original=getattr(module, name), _name=name, **kwargs):
      recorded.setdefault(_name, (_original, args, kwargs))
      return _original(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      hidden = nn.relu(nn.Dense(8)(x))
      return nn.Dense(3)(hidden), hidden

  rng = np.random.default_rng(0)
  x = rng.normal(size=(240, 5)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)
  model = Net()
  fitted = resmem_jax.fit(model, model.init(jax.random.key(0), x[:1]), train=(x[:120], y[:120]),
                          validation=(x[120:200], y[120:200]), gate_alpha=0.05, progress=False)
  fitted.evaluate(x[200:], y[200:])
  assert len(recorded) == 6, sorted(recorded)
  for name, (fn, args, kwargs) in recorded.items():
    assert export.export(fn, platforms=PLATFORMS)(*args, **kwargs).platforms == PLATFORMS, name
