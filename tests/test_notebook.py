"""examples/null_text_w_ptp.ipynb runs top to bottom (CI setting: NTI_NOTEBOOK_FAST=1, 10 DDIM
steps x 3 null-text steps, the bundled toy model and sample) and reconstructs as it should."""

import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "null_text_w_ptp.ipynb")
# Measured in this setting (toy model, orange-circle sample): null-text 20.04 dB, ddim 12.45 dB.
NULL_TEXT_MIN_DB = 17.0


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_runs(tmp_path, monkeypatch):
    for var in ("NTI_MODEL", "NTI_IMAGE", "NTI_PROMPT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NTI_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("NTI_NOTEBOOK_OUT", str(tmp_path / "out"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream")
    m = re.search(r"reconstruction PSNR: ddim (\d+\.\d+) dB, null-text (\d+\.\d+) dB", text)
    assert m, text
    ddim, null_text = float(m.group(1)), float(m.group(2))
    assert null_text > ddim + 5 and null_text > NULL_TEXT_MIN_DB
    assert re.search(r"reloaded reconstruction max \|difference\|: 0\b", text), text
    for name in ("attention.png", "attention-edit.png", "inversion.safetensors"):
        assert os.path.isfile(tmp_path / "out" / name)
    images = sum(o.output_type == "display_data" and "image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 6
