"""The README's Colab example runs as written, and its set-up commands are the CI's."""
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_colab_example_runs_on_user_arrays(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # the example saves to /tmp/my_memory; keep the test's own copy
  rng = np.random.default_rng(0)
  n, q, d, c = 2000, 300, 16, 5
  env = {
      "train_emb": rng.normal(size=(n, d)).astype(np.float32),
      "test_emb": rng.normal(size=(q, d)).astype(np.float32),
      "train_logits": rng.normal(size=(n, c)).astype(np.float32),
      "test_logits": rng.normal(size=(q, c)).astype(np.float32),
      "train_labels": rng.integers(0, c, n), "test_labels": rng.integers(0, c, q),
      "new_emb": rng.normal(size=(10, d)).astype(np.float32),
      "new_residuals": np.zeros((10, c), np.float32),
  }
  readme = (ROOT / "README.md").read_text()
  code = readme.split("```python\n", 1)[1].split("```", 1)[0]
  code = code.replace("/tmp/my_memory", str(tmp_path / "my_memory"))
  exec(compile(code, "README.md", "exec"), env)  # pylint: disable=exec-used
  assert env["pred"].shape == (q, c)
  assert env["memory"].size == n + 10


def test_ci_runs_the_readme_test_command():
  lines = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
  assert len(lines) == 2
  assert "experiments.resmem" in lines[0] and "digits" in lines[0]
  assert lines[1] in (ROOT / ".ci" / "run").read_text()
