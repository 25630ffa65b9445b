"""The Colab notebook runs end to end: executed cell by cell in a real Jupyter kernel, on CPU, tiny size.

Parameters are injected the way papermill does it (a cell tagged `injected-parameters` after the
cell tagged `parameters`), so the notebook's own defaults stay what a Colab user gets. The kernel
is this interpreter (the project's .venv). It sees one CPU device, as on a Colab CPU runtime, not
conftest's 8 fake ones (sharding is tested elsewhere; here they would only slow the compiles), and
the notebook's `python -m t5x_cpt.train` children inherit that.
"""

import json
import math
import os
import sys
import time

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "colab_tpu_demo.ipynb")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KERNEL_NAME = "t5x_cpt_test"


def kernel_manager(kernels_dir) -> KernelManager:
    """A manager for a kernel that runs sys.executable, whatever kernelspecs this machine has installed."""
    spec_dir = kernels_dir / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "t5x_cpt (test)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels_dir)]))


def single_cpu_environment() -> dict[str, str]:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    return {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}


def inject_parameters(notebook, **values) -> None:
    """Adds papermill's `injected-parameters` cell right after the notebook's one `parameters` cell."""
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(tagged[0] + 1, injected)


def eval_losses(model_dir, task):
    """{step: validation loss} from MODEL_DIR/metrics.jsonl."""
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r[f"eval/{task}/loss"] for r in records if f"eval/{task}/loss" in r}


def printed_text(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
                   if output.get("output_type") == "stream")


def test_notebook_pretrains_continues_and_plots_on_cpu(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    output_dir = tmp_path / "runs"
    inject_parameters(notebook, SIZE="tiny", OUTPUT_DIR=str(output_dir))
    client = NotebookClient(notebook, km=kernel_manager(tmp_path / "kernels"), timeout=300,
                            resources={"metadata": {"path": REPO}})
    start = time.time()
    client.execute(env=single_cpu_environment())  # a failing cell raises CellExecutionError with its traceback
    print(f"notebook executed in {time.time() - start:.0f}s")

    printed = printed_text(notebook)
    assert "nothing to install" in printed
    assert "JAX platform: cpu; model size: tiny" in printed
    assert "step 40/40" in printed and "step 20/20" in printed  # the training children's progress lines

    runs = output_dir / "tiny"
    assert (runs / "losses.png").read_bytes()[:8] == PNG_SIGNATURE
    shown = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(shown) == 1, "the plot is displayed in the notebook once"

    source = {task: eval_losses(runs / "pretrain_en", task) for task in ("lo_help_en", "lo_help_zh")}
    cpt = {task: eval_losses(runs / "cpt_zh_replay25", task) for task in ("lo_help_en", "lo_help_zh")}
    for curve in [*source.values(), *cpt.values()]:
        assert curve and all(math.isfinite(loss) for loss in curve.values()), curve
    assert sorted(source["lo_help_en"]) == list(range(0, 41, 5))
    assert sorted(cpt["lo_help_zh"]) == list(range(0, 21, 5))
    # Pre-training learned English; CPT learned Chinese from where the English model stood.
    assert source["lo_help_en"][40] < source["lo_help_en"][0]
    assert cpt["lo_help_zh"][20] < cpt["lo_help_zh"][0]
    # CPT's step 0 is the source model's final state: the same weights on the same validation batches.
    assert math.isclose(cpt["lo_help_zh"][0], source["lo_help_zh"][40], abs_tol=1e-4)
