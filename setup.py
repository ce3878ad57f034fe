"""vlm_jax: InternVL3 in JAX/Flax for research training on GPU and TPU."""

import setuptools

# Versions measured to install and work together (Python 3.11).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "clu==0.0.12",
    "einops==0.8.2",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "huggingface-hub==2.4.0",
    "safetensors==0.8.0",
    "tensorflow-datasets==4.9.10",
    "grain==0.2.18",
    "array-record==0.8.6",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "tqdm==4.70.1",
    # clu.metric_writers and clu.periodic_actions need both.
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",
]

EXTRAS_REQUIRE = {
    "dev": [
        # The PyTorch reference for parity tests and benchmarks (CPU build).
        "torch==2.13.0",
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",  # the suite runs on two workers (pytest.ini)
        "nbclient==0.11.0",
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
        "jupytext==1.19.6",  # the notebooks are kept as text (experiments/notebooks/)
        "matplotlib",
        # Reference for the COCO detection metrics test only; never imported by vlm_jax.
        "pycocotools>=2.0.8",
    ],
    "notebooks": ["matplotlib", "jupytext==1.19.6"],
}

setuptools.setup(
    name="vlm_jax",
    version="0.1.0",
    description="InternVL3 vision-language models in JAX/Flax: conversion, multitask heads, sharded training.",
    packages=setuptools.find_packages(include=["vlm_jax", "vlm_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
