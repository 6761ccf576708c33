"""The README's Colab example runs as pasted, and its set-up commands are the CI's."""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_colab_example_runs_as_written(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  readme = (ROOT / "README.md").read_text()
  code = readme.split("```python\n", 1)[1].split("```", 1)[0]
  code = code.replace("/tmp/my_memory", str(tmp_path / "my_memory"))
  env = {}
  exec(compile(code, "README.md", "exec"), env)  # pylint: disable=exec-used
  assert env["pred"].shape == (500, 5)
  assert env["memory"].size == 2010
  from resmem_jax.core import metrics
  # The example's data are learnable: the base is far above chance and ResMem not below it.
  base_acc = float(metrics.accuracy(env["base"], env["test_labels"]))
  assert base_acc > 0.5
  assert float(metrics.accuracy(env["pred"], env["test_labels"])) >= base_acc - 0.02


def test_ci_runs_the_readme_test_command():
  lines = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
  assert len(lines) == 2
  assert "experiments.resmem" in lines[0] and "digits" in lines[0]
  assert lines[1] in (ROOT / ".ci" / "run").read_text()
