"""Run by test_memory_hosts.py in each of 2 processes: a host-sharded memory (each process holds
only its rows) against the single-host memory of all rows, built in the same process."""
import json
import sys

import jax
import numpy as np

jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from resmem_jax import memory as memory_lib, resmem  # noqa: E402
from resmem_jax.memory import hosts  # noqa: E402

out_path, backend, residual_format = sys.argv[3], sys.argv[4], sys.argv[5]
rng = np.random.default_rng(0)  # the same data in both processes
keys = rng.normal(size=(1001, 12)).astype(np.float32)
keys[700] = keys[3]  # an exact tie across the two hosts: the lower id must win, as on one host
residuals = rng.normal(size=(1001, 6)).astype(np.float32)
labels = rng.integers(0, 6, 1001)
queries = np.concatenate([rng.normal(size=(150, 12)).astype(np.float32), keys[[3, 10, 900]]])
base = rng.uniform(size=(153, 6)).astype(np.float32)
options = {"residual_format": residual_format, "labels": labels}
if residual_format == "sparse":
  options["top_m"] = 2
split = 600  # uneven parts: process 0 holds rows [0, 600), process 1 rows [600, 1001)
mine = slice(0, split) if jax.process_index() == 0 else slice(split, None)
sharded = hosts.build_host_sharded_memory(keys[mine], residuals[mine], backend=backend,
                                          **{**options, "labels": labels[mine]})
whole = memory_lib.build_memory(keys, residuals, backend=backend, **options)
assert sharded.local.size == len(keys[mine]) and sharded.size == 1001

d_sharded, i_sharded = sharded.search(queries, 25)
d_whole, i_whole = whole.search(queries, 25)
result = {
    "ids_equal": bool(np.array_equal(i_sharded, i_whole)),
    "distances_equal": bool(np.array_equal(d_sharded, d_whole)),
    "tie_id": int(i_sharded[150, 0]),
    "overlap": float(np.mean([len(set(a) & set(b)) / 25 for a, b in zip(i_sharded, i_whole)])),
    "rows_equal": all(np.array_equal(a, b) for a, b in zip(
        sharded.residual_rows(i_whole), whole.residual_rows(i_whole)) if a is not None),
    "dense_equal": bool(np.array_equal(sharded.gather_residuals(i_whole),
                                       whole.gather_residuals(i_whole))),
    "labels_equal": bool(np.array_equal(sharded.labels_of(i_whole), whole.labels[i_whole])),
    "max_prediction_gap": float(np.abs(resmem.predict(sharded, base, queries, 25, 0.4)
                                       - resmem.predict(whole, base, queries, 25, 0.4)).max()),
}
sharded.save(out_path + "_memory")
loaded = hosts.HostShardedMemory.load(out_path + "_memory")
result["loaded_equal"] = bool(np.array_equal(loaded.search(queries, 7)[1], whole.search(queries, 7)[1]))
try:  # different queries on the two processes: refused on both, no hang
  sharded.search(queries + jax.process_index(), 3)
  result["mismatch"] = "accepted"
except ValueError as err:
  result["mismatch"] = str(err)
with open(f"{out_path}_{jax.process_index()}.json", "w") as f:
  json.dump(result, f)
