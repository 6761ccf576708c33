"""Orbax checkpoints of the train state, and rebuilding the trained model from a workdir.

Layout (unchanged since the first release, so older workdirs still restore and resume):

  WORKDIR/checkpoints/<step>/   composite of ``variables`` ({"params"[, "batch_stats"]}) and
                                ``opt`` ({"step", "opt_state"})
  WORKDIR/model_info.json       ``num_classes`` and the input's shape: what :func:`restore_model`
                                needs besides the model settings, so it never reads the data
"""
from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from resmem_jax import jsonio
from resmem_jax import models
from resmem_jax.settings import ModelSettings
from resmem_jax.training.state import TrainState

CHECKPOINT_DIR = "checkpoints"
MODEL_INFO = "model_info.json"


class CheckpointError(ValueError):
  """A checkpoint on disk cannot be read (the message names the folder and the way forward)."""


def _unreadable(folder: pathlib.Path, err: Exception) -> CheckpointError:
  reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
  return CheckpointError(
      f"cannot read the checkpoint {folder} ({type(err).__name__}: {reason}); move that folder out "
      f"of {folder.parent} to resume from the checkpoint before it, or pass --start_over to move "
      "the run to WORKDIR/superseded/ and train again")


def write_model_info(workdir: pathlib.Path, info, num_params: int) -> None:
  """WORKDIR/model_info.json from the data set's ``info`` (call on process 0 only)."""
  jsonio.write_json_atomic(workdir / MODEL_INFO, {
      "dataset": info.name, "num_classes": int(info.num_classes),
      "input_shape": [int(d) for d in info.input_shape], "input_dtype": info.input_dtype,
      "num_params": int(num_params)})


def _items(state: TrainState) -> dict:
  return {"variables": state.variables(),
          "opt": {"step": state.step, "opt_state": state.opt_state}}


def checkpoint_manager(workdir: pathlib.Path, max_to_keep: int):
  """An Orbax manager over WORKDIR/checkpoints keeping the latest ``max_to_keep`` steps."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager((workdir / CHECKPOINT_DIR).absolute(), options=options)


def host_copy(tree):
  """Host arrays of a replicated state on this process alone (no collective: a replicated array's
  first local shard is the whole array)."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_shards[0].data)
    return np.asarray(x)
  return jax.tree_util.tree_map(fetch, tree)


def _workdir(manager) -> pathlib.Path:
  return pathlib.Path(manager.directory).parent


def save(manager, state: TrainState, force: bool = False) -> None:
  """Saves ``state`` under its step (asynchronously; ``manager.wait_until_finished`` waits).

  The variables' digest is recorded in WORKDIR/run.json first (``provenance.record_checkpoint``):
  a restore checks the step against it."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from resmem_jax.training import provenance  # pylint: disable=g-import-not-at-top
  items = _items(state)
  step = int(jax.device_get(state.step))
  if jax.process_index() == 0 and (_workdir(manager) / provenance.RUN_FILE).exists():
    provenance.record_checkpoint(_workdir(manager), step,
                                 provenance.variables_digest(host_copy(items["variables"])))
  manager.save(step, args=ocp.args.Composite(
      variables=ocp.args.StandardSave(items["variables"]),
      opt=ocp.args.StandardSave(items["opt"])), force=force)


def restore(manager, step: int, template: TrainState) -> TrainState:
  """The state saved at ``step``, with the shapes, dtypes and shardings of ``template``."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _items(template))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(abstract["variables"]),
        opt=ocp.args.StandardRestore(abstract["opt"])))
  except Exception as err:  # pylint: disable=broad-except  # Orbax / TensorStore raise many types
    raise _unreadable(pathlib.Path(manager.directory) / str(step), err) from err
  variables, opt = restored["variables"], restored["opt"]
  from resmem_jax.training import provenance  # pylint: disable=g-import-not-at-top
  provenance.check_restored(_workdir(manager), step,
                            provenance.variables_digest(host_copy(dict(variables))))
  return template.replace(step=opt["step"], params=variables["params"],
                          batch_stats=variables.get("batch_stats", template.batch_stats),
                          opt_state=opt["opt_state"])


def restore_model(workdir: str | os.PathLike, model: ModelSettings, dtype: str = "float32"):
  """Rebuilds the module and loads its latest checkpointed variables.

  Returns ``(module, variables, step)``; ``variables`` holds ``params`` (and ``batch_stats``
  for batch-norm models), ready for ``module.apply(variables, x, train=False)``. ``dtype`` is
  the compute dtype (``train.dtype``). Raises FileNotFoundError when WORKDIR holds no checkpoint
  or no model_info.json.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  ckpt_dir = workdir / CHECKPOINT_DIR
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f"workdir has no checkpoints: {ckpt_dir} does not exist; "
                            "train first with experiments/train.py --workdir")
  manager = ocp.CheckpointManager(ckpt_dir.absolute())
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"workdir has no checkpoints: {ckpt_dir} is empty")
    info_path = workdir / MODEL_INFO
    if not info_path.is_file():
      raise FileNotFoundError(f"{info_path} is missing (training writes it beside the "
                              "checkpoints and it holds the model's num_classes); rerun "
                              "experiments/train.py with the same --workdir and config to write it")
    try:
      num_classes = int(jsonio.loads(info_path.read_text())["num_classes"])
    except (OSError, ValueError, KeyError, TypeError) as err:
      raise CheckpointError(f"{info_path} cannot be read ({err!r}); rerun the same command (training "
                            "rewrites it) or restore it") from None
    module = models.build_model(model, num_classes, dtype=dtype)
    try:
      restored = manager.restore(step,
                                 args=ocp.args.Composite(variables=ocp.args.StandardRestore()))
    except Exception as err:  # pylint: disable=broad-except  # Orbax / TensorStore raise many types
      raise _unreadable(ckpt_dir / str(step), err) from err
  finally:
    manager.close()
  variables = jax.tree_util.tree_map(jnp.asarray, dict(restored["variables"]))
  return module, variables, int(step)
