"""phenoflow: flow-matching generative models of perturbed cells (microscopy and gene expression).

Torch is pinned by the Makefile through `constraints.txt` (torch 2.13.0), installed before this package
so that no dependency can pull a second, multi-GB CUDA build of torch.
"""
from setuptools import find_packages, setup

CORE = [
    "torch",
    "triton",
    "torchdiffeq",
    "webdataset",
    "numpy",
    "pyyaml",
    "safetensors",
    "POT",
    "tqdm",
    "pillow",
    "scipy",
    "matplotlib",
    "tensorboard",  # event files next to log.jsonl (torch.utils.tensorboard); training continues without it
]

EXTRAS = {
    # flash-attn needs CUDA_HOME and a CUDA torch to build; DALI's wheel is CUDA 13.
    "gpu": ["flash-attn", "nvidia-dali-cuda130"],
    "dali": ["nvidia-dali-cuda130"],
    "distributed": ["deepspeed"],
    "chem": ["rdkit"],
    "sc": ["anndata", "scanpy", "scikit-misc"],  # scikit-misc: scanpy's seurat_v3 highly variable genes
    "eval": ["scipy", "matplotlib", "tifffile"],
    "dev": ["pytest", "pytest-timeout", "ruff", "hypothesis"],
    # cell-eval is a TEST reference for the VCC metrics (phenoflow.eval.expression never imports it).
    "vcc": ["cell-eval==0.8.2"],
}

setup(
    name="phenoflow",
    version="0.1.0",
    description="Flow-matching models of cellular perturbation responses: MiT for microscopy, PRiMeFlow for expression",
    packages=find_packages(include=["phenoflow", "phenoflow.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["phenoflow=phenoflow.cli:main"]},
)
