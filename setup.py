from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "megatron_moe_reg" / "__init__.py").read_text(), version)

setup(
    name="megatron-moe-reg",
    version=version["__version__"],
    description="MoE regularization losses, routers, grouped-GEMM experts and routing analysis "
                "for NVIDIA Megatron-Core",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_moe_reg", "megatron_moe_reg.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16,<0.20",
        "sentencepiece>=0.2",
        "numpy",
        "tensorboard",
        "tqdm",
        "matplotlib",
        "packaging",
        "psutil",
    ],
    extras_require={
        # apex is a from-source build (see README); it is optional.
        "gpu": ["transformer-engine[pytorch]", "triton"],
        "triton": ["triton"],
        # triton: megatron-core 0.19 imports it; pybind11: builds 0.19's dataset helper on 3.11
        "test": ["pytest>=8", "pytest-timeout", "pybind11", "triton>=3.8"],
    },
    entry_points={"console_scripts": ["moe-reg=megatron_moe_reg.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
