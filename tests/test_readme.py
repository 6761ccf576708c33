"""The README's Colab example runs as pasted in a fresh Jupyter kernel; its set-up commands are
the CI's."""
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_block(language: str) -> str:
  return (ROOT / "README.md").read_text().split(f"```{language}\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_colab_example_runs_verbatim_in_a_fresh_jupyter_kernel(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  code = _readme_block("python")
  check = ("assert report['comparison']['rows'] == 1000 and probabilities.shape == (1000, 5)\n"
           "assert abs(probabilities.sum(-1) - 1).max() < 1e-5 and pred.shape == (1000, 5)\n"
           "assert (resmem.predict(x_test) == classes).all() and ids.shape == (1000, 16)\n"
           "assert (probabilities.argmax(-1) == classes).all() and resmem.gate is None\n"
           "assert report['comparison']['test_accuracy_gain'] > 0  # the example shows the method\n"
           "print('README-OK', report['base']['test_accuracy'] > 0.5)")
  notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code),
                                             nbformat.v4.new_code_cell(check)])
  # The kernel imports resmem_jax from this checkout (pip install -e . does the same for users).
  monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = "".join(o.get("text", "") for o in notebook.cells[1].outputs)
  assert "README-OK True" in outputs
  assert (tmp_path / "my_resmem" / "memory" / "manifest.json").exists()


def test_ci_runs_the_readme_test_command():
  lines = _readme_block("bash").splitlines()
  assert len(lines) == 2
  assert "resmem" in lines[0] and "digits" in lines[0]
  assert lines[1] in (ROOT / ".ci" / "run").read_text()
