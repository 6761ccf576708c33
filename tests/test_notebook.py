"""experiments/colab.ipynb: stored without outputs, and runs top to bottom in a fresh Jupyter kernel
(the README's Colab example, its comparison line and its plot)."""
import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "colab.ipynb"


def test_notebook_is_stored_clean():
  nbformat = pytest.importorskip("nbformat")
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  assert notebook.nbformat == 4 and notebook.metadata.kernelspec.name == "python3"
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_runs_in_a_fresh_jupyter_kernel(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # The kernel imports resmem_jax from this checkout, so the install cell installs nothing.
  monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()

  def text(cell):
    return "".join(o.get("text", "") for o in cell.get("outputs", []))

  printed = "".join(text(cell) for cell in notebook.cells)
  assert re.search(r"ResMem gain: \+\d+\.\d points \(95% CI \+\d+\.\d to \+\d+\.\d; "
                   r"\d+ gained, \d+ lost\), McNemar p = \d", printed), printed
  plot = [cell for cell in notebook.cells if "plt.show()" in cell.source]
  assert len(plot) == 1
  assert any("image/png" in o.get("data", {}) for o in plot[0].outputs)
  assert (tmp_path / "my_resmem" / "memory" / "manifest.json").exists()
