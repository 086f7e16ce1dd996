"""The notebooks run from top to bottom (shortened by environment variables where they offer it)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "..", "notebooks")


@pytest.mark.parametrize("name,env", [("adversarial_alignment.ipynb", {"NOTEBOOK_NUM_IMAGES": "2"}),
                                      ("pag_toy2d.ipynb", {"NOTEBOOK_EPOCHS": "3"}),
                                      ("harmonization_demo.ipynb", {"NOTEBOOK_TRAIN_STEPS": "2",
                                                                    "NOTEBOOK_IMAGE_SIZE": "64",
                                                                    "NOTEBOOK_NUM_IMAGES": "8"})])
def test_notebook_runs(name, env, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOKS)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
