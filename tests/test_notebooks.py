"""Every notebook runs top to bottom on tiny settings (nbclient, the venv's python3 kernel).

What runs is what is in git: the text notebooks experiments/notebooks/<name>.py (jupytext percent format), read with
`jupytext.read`; a fast test checks that each committed experiments/<name>.ipynb (the copy Colab opens) has the same
cells.

The kernels get `VLM_JAX_NOTEBOOK_TINY=1` (the notebooks' parameter cells read it), fresh temporary folders, one CPU
device, the Agg backend and a shared persistent compilation cache (the restore notebook reuses the training
notebook's compiled eval step). The restore notebook reads the training notebook's workdir, so the training
notebook runs once per module in a fixture, in a background thread while the quickstart notebook runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jupytext
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from fixtures import subprocess_xla_flags

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
TEXT_NOTEBOOKS = EXPERIMENTS / "notebooks"
NOTEBOOKS = ("quickstart", "train_spatial_shapes", "restore_and_evaluate")
SYNC = "jupytext --sync experiments/notebooks/*.py"  # experiments/notebooks/README.md


def read_text_notebook(name: str) -> nbformat.NotebookNode:
    return jupytext.read(TEXT_NOTEBOOKS / f"{name}.py")


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """Environment for the kernels (they inherit this process's environment), restored afterwards."""
    root = tmp_path_factory.mktemp("notebooks")
    env = {
        "VLM_JAX_NOTEBOOK_TINY": "1",
        "VLM_JAX_NOTEBOOK_DIR": str(root / "quickstart"),
        "VLM_JAX_NOTEBOOK_WORKDIR": str(root / "train"),
        "VLM_JAX_NOTEBOOK_DATA_DIR": str(root / "tfds"),
        "VLM_JAX_CHECKPOINT": "",
        "MPLBACKEND": "Agg",
        "XLA_FLAGS": subprocess_xla_flags(1),
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env


def run_notebook(name: str, probe: str | None = None) -> nbformat.NotebookNode:
    """Executes the text notebook experiments/notebooks/<name>.py in experiments/, where its .ipynb opens (a cell
    error raises CellExecutionError).

    probe: extra code run after the last cell; its stdout is returned as the notebook's `probe` metadata.
    """
    nb = read_text_notebook(name)
    if probe is not None:
        nb.cells.append(nbformat.v4.new_code_cell(probe))
    client = NotebookClient(nb, kernel_name="python3", timeout=300, allow_errors=False,
                            resources={"metadata": {"path": str(EXPERIMENTS)}})
    client.execute()
    if probe is not None:
        nb.metadata["probe"] = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    return nb


def _outputs(nb, output_type: str):
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == output_type]


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for o in _outputs(nb, "display_data"))


@pytest.fixture(scope="module")
def training(kernel_env):
    """Starts the training notebook in a background thread (executed once; the restore notebook reads its
    workdir). XLA compiles on one core, so the quickstart kernel runs on the other meanwhile."""
    result = {}

    def target():
        try:
            result["nb"] = run_notebook("train_spatial_shapes")
        except BaseException as e:  # re-raised in the test thread
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    yield thread, result, Path(kernel_env["VLM_JAX_NOTEBOOK_WORKDIR"])
    thread.join()


@pytest.fixture(scope="module")
def trained(training):
    thread, result, workdir = training
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["nb"], workdir


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_ipynb_has_the_cells_of_its_text_notebook(name):
    text = read_text_notebook(name)
    nb = nbformat.read(EXPERIMENTS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert [(c.cell_type, c.source) for c in nb.cells] == [(c.cell_type, c.source) for c in text.cells], \
        f"experiments/{name}.ipynb differs from experiments/notebooks/{name}.py: run `{SYNC}`"
    assert all(not c.outputs and c.execution_count is None for c in _code_cells(nb)), f"{name}.ipynb: clear the outputs"
    for params in (_code_cells(text)[1], _code_cells(nb)[1]):
        assert "parameters" in params.metadata.get("tags", []) and "VLM_JAX_NOTEBOOK_TINY" in params.source


# ---- the install cell (first code cell, the same in every notebook), run here with a recording `run` -------------

PIP = [sys.executable, "-m", "pip", "install", "-q"]


def install_cell() -> str:
    return _code_cells(read_text_notebook(NOTEBOOKS[0]))[0].source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_says_how_to_open_it_on_colab_and_shares_the_install_cell(name):
    nb = read_text_notebook(name)
    intro = nb.cells[0].source
    assert nb.cells[0].cell_type == "markdown", name
    assert f"colab.research.google.com/github/<owner>/<repo>/blob/main/experiments/{name}.ipynb" in intro
    assert "File > Upload notebook" in intro and "`REPO_URL`" in intro and "pip wheel --no-deps ." in intro
    install = _code_cells(nb)[0].source
    assert install == install_cell(), f"{name}: the install cell differs from {NOTEBOOKS[0]}'s"
    assert '\nREPO_URL = ""  # @param {type:"string"}\n' in install  # one Colab form field, empty by default
    for path in (TEXT_NOTEBOOKS / f"{name}.py", EXPERIMENTS / f"{name}.ipynb", TEXT_NOTEBOOKS / "README.md"):
        made_up = re.findall(r"github(?:\.com)?/(?!<owner>/)[^/\s]+/", path.read_text())
        assert not made_up, f"{path}: a GitHub owner that is not the reader's fork's `<owner>`: {made_up}"


class Commands:
    """A `run` for the install cell: records every command; runs git (a clone is cheap), never pip."""

    def __init__(self, real_run):
        self.calls, self.real_run = [], real_run

    def __call__(self, cmd, check=False, **kwargs):
        self.calls.append(list(cmd))
        if cmd[0] == "git":
            return self.real_run(cmd, check=check, capture_output=True, **kwargs)
        return subprocess.CompletedProcess(cmd, 0)


@pytest.fixture
def fresh_runtime(tmp_path, monkeypatch):
    """A runtime like a fresh Colab one: vlm_jax not importable, no GPU, the working folder outside any checkout.

    Runs the install cell as written (REPO_URL empty, so it must raise) and returns its namespace, the recorder its
    `run` defaults to and the working folder.
    """
    real_find_spec, real_which = importlib.util.find_spec, shutil.which
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "vlm_jax" else real_find_spec(name, *a, **k))
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "nvidia-smi" else real_which(name))
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the cell prepends an editable checkout
    commands = Commands(subprocess.run)
    monkeypatch.setattr(subprocess, "run", commands)  # the cell's `run` default
    work = tmp_path / "content"
    work.mkdir()
    monkeypatch.chdir(work)
    namespace = {}
    with pytest.raises(RuntimeError) as error:
        exec(install_cell(), namespace)
    message = str(error.value)
    assert "REPO_URL" in message and "pip wheel --no-deps ." in message and "vlm_jax-*.whl" in message, message
    assert commands.calls == [], "nothing to install from, so nothing may run"
    return namespace, commands, work


def test_install_cell_without_url_or_wheel_says_what_to_set(fresh_runtime):
    namespace, commands, _ = fresh_runtime
    with pytest.raises(RuntimeError, match="set REPO_URL"):
        namespace["install_vlm_jax"]("", namespace["CHECKOUT"])
    assert commands.calls == []


def test_install_cell_installs_an_uploaded_wheel(fresh_runtime, monkeypatch):
    namespace, commands, work = fresh_runtime
    wheel = work / "vlm_jax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")  # a GPU runtime
    done = namespace["install_vlm_jax"]("", namespace["CHECKOUT"])
    assert commands.calls == [PIP + ["jax[cuda12]==0.10.2"], PIP + [f"{wheel}[notebooks]"]]
    assert str(wheel) in done and "restart the runtime" in done


def test_install_cell_clones_repo_url_and_installs_the_clone(fresh_runtime, tmp_path):
    namespace, commands, _ = fresh_runtime
    fork = tmp_path / "fork"
    (fork / "vlm_jax").mkdir(parents=True)
    (fork / "setup.py").write_text("")
    (fork / "vlm_jax" / "__init__.py").write_text("")
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "fork"]):
        commands.real_run(["git", "-C", str(fork), "-c", "init.defaultBranch=main", "-c", "user.name=n",
                           "-c", "user.email=n@example.com", *args], check=True, capture_output=True)
    checkout = Path(namespace["CHECKOUT"])
    done = namespace["install_vlm_jax"](fork.as_uri(), str(checkout))
    assert commands.calls == [["git", "clone", "--depth", "1", fork.as_uri(), str(checkout)],
                              PIP + ["-e", f"{checkout}[notebooks]"]]
    assert (checkout / "vlm_jax" / "__init__.py").is_file() and sys.path[0] == str(checkout)
    assert fork.as_uri() in done


def test_install_cell_installs_the_checkout_it_was_opened_in(fresh_runtime, tmp_path, monkeypatch):
    namespace, commands, work = fresh_runtime
    repo = tmp_path / "repo"
    (repo / "vlm_jax").mkdir(parents=True)
    (repo / "setup.py").write_text("")
    (repo / "experiments" / "notebooks").mkdir(parents=True)
    (repo / "experiments" / "notebooks" / "vlm_jax-0.1.0-py3-none-any.whl").write_bytes(b"")  # a checkout wins
    for folder in (repo / "experiments", repo / "experiments" / "notebooks"):
        commands.calls.clear()
        monkeypatch.chdir(folder)
        namespace["install_vlm_jax"]("https://example.com/unused.git", namespace["CHECKOUT"])
        assert commands.calls == [PIP + ["-e", f"{repo}[notebooks]"]], folder


def test_install_cell_is_skipped_when_vlm_jax_is_importable(kernel_env):
    nb = read_text_notebook("quickstart")
    nb.cells = _code_cells(nb)[:1]
    client = NotebookClient(nb, kernel_name="python3", timeout=60, resources={"metadata": {"path": str(EXPERIMENTS)}})
    client.execute()
    assert "skipping the install" in "".join(o.get("text", "") for o in nb.cells[0].outputs)


def test_quickstart(kernel_env, training):  # `training`: the training notebook runs alongside
    probe = ("import json; print(json.dumps(dict(tiles=list(tiles.shape), sim=list(sim.shape), "
             "tokens=len(result.token_ids))))")
    nb = run_notebook("quickstart", probe)
    out = json.loads(nb.metadata["probe"])
    assert out["tiles"][0] > 1 and out["sim"] == [4, 4] and 1 <= out["tokens"] <= 8
    assert _images(nb) == 2  # tiles, similarity heat map
    assert (Path(kernel_env["VLM_JAX_NOTEBOOK_DIR"]) / "converted" / "vlm_jax_config.json").exists()


def test_train_spatial_shapes(trained):
    nb, workdir = trained
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in records] == [10, 20]
    assert (workdir / "checkpoints" / "20").is_dir()
    assert _images(nb) == 4  # examples, curves, predictions, confusion matrix


def test_restore_and_evaluate(trained):
    _, workdir = trained
    probe = "import json; print(json.dumps(dict(step=int(run.step), results=results)))"
    nb = run_notebook("restore_and_evaluate", probe)
    out = json.loads(nb.metadata["probe"])
    # The restored checkpoint reproduces the evaluation the training run logged at the same step.
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in logged if r["step"] == out["step"] and r["split"] == "validation"][-1]
    for key in ("t2i_r1", "i2t_r5", "box_iou", "spatial_acc", "loss/total"):
        assert out["results"][key] == pytest.approx(last[key], rel=1e-5, abs=1e-6), key
    assert _images(nb) == 1  # retrieval examples


def test_readme_figure_script_reads_the_trained_workdir(trained, tmp_path):
    _, workdir = trained
    out = tmp_path / "figure.png"
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / "make_readme_figure.py"), "--workdir", str(workdir),
                           "--output", str(out), "--num_examples", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 20 test" in proc.stdout  # read the finished run, did not train again
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size < 150_000


def test_export_command_writes_the_trained_run_for_transformers(trained, tmp_path, capsys):
    import json

    import transformers

    from vlm_jax import export

    _, workdir = trained
    out = tmp_path / "export"
    export.main(["--workdir", str(workdir), "--output", str(out)])
    assert '"step": 20' in capsys.readouterr().out
    model = transformers.InternVLForConditionalGeneration.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == model.get_input_embeddings().weight.shape[0]
    info = json.loads((out / export.HEADS_CONFIG).read_text())
    assert sorted(info["tasks"]) == ["box", "itc", "itm", "spatial"] and (out / export.HEADS_FILE).exists()


# ---- vlm_jax.viz: the helpers the notebooks call ------------------------------------------------------------------


def test_viz_to_uint8_inverts_the_preprocessing_normalisation():
    from vlm_jax import viz
    from vlm_jax.data import preprocess

    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(viz.to_uint8(preprocess.normalize(pixels)), pixels)
    assert viz.to_uint8(pixels) is pixels


def test_viz_top_k_and_metric_series_against_brute_force(tmp_path):
    from vlm_jax import viz

    sim = np.random.default_rng(1).standard_normal((6, 9))
    expected = [sorted(range(9), key=lambda j: -sim[i, j])[:5] for i in range(6)]
    assert viz.top_k_captions(sim, 5).tolist() == expected
    rows = [dict(step=20, split="validation", a=2.0), dict(step=10, split="validation", a=1.0),
            dict(step=10, split="train", a=5.0), dict(step=30, split="validation")]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = viz.read_metrics(tmp_path)  # a workdir or the file itself
    assert records == rows == viz.read_metrics(tmp_path / "metrics.jsonl")
    steps, values = viz.metric_series(records, "a", "validation")
    assert steps.tolist() == [10, 20] and values.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="no metrics file"):
        viz.read_metrics(tmp_path / "missing")


def test_viz_figures_draw_what_they_are_given():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from vlm_jax import viz

    images = np.zeros((3, 16, 16, 3), np.uint8)
    boxes = np.tile([[0.1, 0.2, 0.5, 0.6]], (3, 1)).astype(np.float32)
    fig = viz.examples_grid(images, ["a", "b", "c"], boxes=boxes, pred_boxes=boxes, ncols=2)
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 3 and all(len(ax.patches) == 2 for ax in drawn)
    x0, y0 = drawn[0].patches[0].get_xy()
    assert (x0, y0) == pytest.approx((0.1 * 16 - 0.5, 0.2 * 16 - 0.5))  # pixel-exclusive edges, pixel centres
    with pytest.raises(ValueError, match="pred_boxes must be"):
        viz.examples_grid(images, ["a", "b", "c"], pred_boxes=boxes[:2])
    cm = np.arange(36).reshape(6, 6)
    fig2 = viz.plot_confusion_matrix(cm, list("abcdef"))
    assert [t.get_text() for t in fig2.axes[0].texts][:3] == ["0", "1", "2"]
    with pytest.raises(ValueError, match="matrix must be"):
        viz.plot_confusion_matrix(cm, list("abc"))
    plt.close("all")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "--durations=10"]))
