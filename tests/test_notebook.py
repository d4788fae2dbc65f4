"""The Colab notebook: its committed form (outputs cleared, defaults, a torch-safe install) and a CPU run of every
cell against the tiny model and the Korean sample, so a change to the scripts cannot silently break it."""

import ast
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "colab_t4.ipynb"
PROMPTS = ROOT / "notebooks" / "korean_prompts.jsonl"


def load() -> dict:
    """The notebook as plain JSON, so the checks of its committed form need no Jupyter package."""
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        cell["source"] = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    return nb


def parameters_cell(cells):
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must carry the 'parameters' tag"
    return tagged[0]


def code(nb) -> str:
    return "\n".join(c["source"] for c in nb["cells"] if c["cell_type"] == "code")


def assigned(source: str) -> dict:
    """name -> value of each plain assignment in the parameters cell."""
    return {node.targets[0].id: ast.literal_eval(node.value)
            for node in ast.parse(source).body if isinstance(node, ast.Assign)}


def test_committed_notebook_has_no_outputs():
    nb = load()
    assert nb["nbformat"] == 4 and nb["metadata"]["accelerator"] == "GPU"  # Colab opens it on a GPU runtime
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"clear the outputs: {cell['source'][:60]}"


def test_notebook_is_valid_nbformat():
    nbformat = pytest.importorskip("nbformat", reason="pip install -r requirements-dev.txt")
    nbformat.validate(nbformat.read(str(NOTEBOOK), as_version=4))


def test_defaults_are_the_notebook_job():
    params = assigned(parameters_cell(load()["cells"])["source"])
    assert params["MODEL"] == "unsloth/Meta-Llama-3.1-8B"
    assert params["DATASET"] == "jojo0217/korean_safe_conversation"
    assert params["MAX_STEPS"] == 60 and params["INSTALL"] is True
    assert params["SAVE_MERGED"] == params["SAVE_GGUF"] == params["PUSH_TO_HUB"] == ""  # exports off by default
    assert "GITHUB_OWNER/REPO" in params["REPO_URL"]  # the placeholder stays visible until the real path is known


def test_install_pins_the_runtimes_torch():
    source = code(load())
    install = next(line for line in source.splitlines() if "pip install" in line)
    assert "-r requirements.txt" in install and "-c /tmp/torch-constraint.txt" in install
    # pip matches the installed distribution's version; torch.__version__ adds '+cu130' to PyPI wheels' '2.11.0'
    assert "print('torch==' + version('torch'))\" > /tmp/torch-constraint.txt" in source
    assert "--upgrade" not in install and "--force-reinstall" not in install
    assert "HF_TOKEN" in source and "print(os.environ" not in source  # the token is passed on, never shown


def test_prompts_file_is_korean_instructions():
    rows = [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 3 and all(r["instruction"].strip() for r in rows)
    assert all(any("\uac00" <= ch <= "\ud7a3" for ch in r["instruction"]) for r in rows)  # Hangul syllables


def python_on_path(folder: Path) -> str:
    """The notebook calls `python`; make that this interpreter (a venv's, or python3 where no `python` exists)."""
    folder.mkdir()
    shim = folder / "python"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.mark.slow
def test_notebook_runs_on_the_cpu(tmp_path, monkeypatch):
    pytest.importorskip("nbclient", reason="pip install -r requirements-dev.txt")
    pytest.importorskip("ipykernel", reason="pip install -r requirements-dev.txt")
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    cell = parameters_cell(nb.cells)
    run = tmp_path / "run"
    over = dict(INSTALL=False, MODEL="examples/tiny-llama", DATASET="examples/data/korean_safe_sample.jsonl",
                MAX_STEPS=3, MAX_SAMPLES=16, OUTPUT_DIR=str(run), MAX_NEW_TOKENS=8,
                EXTRA_TRAIN_ARGS="--learning_rate 1e-2 --warmup_steps 0 --save_steps 0")
    assert set(over) <= set(assigned(cell.source)), "an override names a parameter the notebook no longer has"
    cell.source = "\n".join(f"{k} = {v!r}" for k, v in {**assigned(cell.source), **over}.items())
    monkeypatch.setenv("PATH", python_on_path(tmp_path / "bin"))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()

    # `!` commands do not stop the notebook when they fail, so read what each printed.
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Traceback" not in text and "\nerror:" not in f"\n{text}", text[-3000:]
    assert "verdict: ready to train" in text  # doctor
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "finished" and record["metrics"]["global_step"] == 3
    assert "final loss:" in text  # memory_report show
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1 and (run / "report.png").is_file()
    answers = [json.loads(line) for line in (run / "compare.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(answers) == len(PROMPTS.read_text(encoding="utf-8").splitlines())
    assert all("base_answer" in a and "answer" in a for a in answers)
    tables = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "text/html" in o.get("data", {})]
    assert any("base_answer" in o["data"]["text/html"] for o in tables)  # the side-by-side table
