"""Prepare another megatron-core release for a compatibility pass of the test suite.

megatron-core 0.17+ is published for Python >= 3.12 only, but its code runs on 3.11. This
unpacks the release's wheel from PyPI into ``.cache/megatron-core-VERSION`` and compiles its
dataset helper extension (``megatron/core/datasets/helpers.cpp``, shipped in the wheel) for the
running Python, then prints the directory to put on ``PYTHONPATH``.

    python tests/megatron_core_compat.py 0.19.2
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepare(version: str) -> Path:
    target = ROOT / ".cache" / f"megatron-core-{version}"
    helpers = target / "megatron" / "core" / "datasets"
    ext = sysconfig.get_config_var("EXT_SUFFIX")
    if (helpers / f"helpers_cpp{ext}").is_file():
        return target
    wheels = ROOT / ".cache" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux2014_x86_64",
                    "-d", str(wheels), f"megatron-core=={version}"], check=True)
    wheel = next(wheels.glob(f"megatron_core-{version}-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    import pybind11

    subprocess.run(["g++", "-O3", "-shared", "-std=c++17", "-fPIC", f"-I{pybind11.get_include()}",
                    f"-I{sysconfig.get_paths()['include']}", str(helpers / "helpers.cpp"),
                    "-o", str(helpers / f"helpers_cpp{ext}")], check=True)
    return target


if __name__ == "__main__":
    print(prepare(sys.argv[1] if len(sys.argv) > 1 else "0.19.2"))
