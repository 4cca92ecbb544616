"""fastrepa: fast trainer and sampler for diffusion transformers with representation alignment.

kernels/ sits at the top level of the repository (the product layout) and installs as the
subpackage `fastrepa.kernels`; a top-level `kernels` package would collide with the PyPI project of
that name.
"""
from setuptools import find_packages, setup

# Every package under fastrepa/, plus kernels/ installed as fastrepa.kernels.
PACKAGES = [p for p in find_packages(include=["fastrepa", "fastrepa.*"])] + ["fastrepa.kernels"]

setup(
    name="fastrepa",
    version="0.1.0",
    description="Fast REPA-family training and sampling for SiT/DiT diffusion transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"fastrepa.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "triton; platform_system == 'Linux'",  # the fused kernels; torch's Linux wheels bring it anyway
        "numpy",
        "pillow",
        "tqdm",
        "safetensors",
        "diffusers",  # fastrepa.vae: the SD-VAE (AutoencoderKL), loaded from local files only
        "torchvision",  # fastrepa.eval: the Inception-v3 building blocks of the FID network
        "scipy",  # fastrepa.eval: the matrix square root of the Fréchet distance
    ],
    extras_require={
        # GPU data loading (issue: data); CPU-only pipelines run with device_id=None.
        "dali": ["nvidia-dali-cuda130"],
        # Optional attention backends: CUDA only, skipped cleanly without it.
        "flash": ["flash-attn"],
        "xformers": ["xformers"],
        # PDE forecasting data (FourierFlow): PDEBench's HDF5 files.
        "pde": ["h5py"],
        # timm: the tests check our pos-embed resampling against timm's, which official REPA calls.
        # tensorboard: the trainer's default metrics sink when installed (tests read the events back).
        # nvidia-dali-cuda130: tests/test_dali.py checks DALI's batches against the torch loader's (CPU
        # pipelines; ~270 MB download, ~650 MB installed, ~30 s); Linux wheels only, the tests skip without it.
        "dev": ["pytest", "pytest-benchmark", "scipy", "timm", "tensorboard", "h5py",
                "nvidia-dali-cuda130; platform_system == 'Linux'"],
    },
)
