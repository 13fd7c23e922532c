"""Installs the crfs_worker package and the `crfs` command, and builds plugin/crfs.so."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildWithPlugin(build_py):
    """Builds crfs.so with make, and ships it inside the package for non-editable installs."""

    def run(self) -> None:
        subprocess.run(["make", "-C", str(HERE / "plugin")], check=True)
        super().run()
        if not getattr(self, "editable_mode", False):
            target = Path(self.build_lib) / "crfs_worker" / "crfs.so"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(HERE / "plugin" / "crfs.so", target)


setup(
    name="crfs",
    version="0.1.0",
    description="Container-Registry Filesystem: lazily fetched container image layers",
    python_requires=">=3.11",
    packages=find_packages(include=["crfs_worker", "crfs_worker.*"]),
    install_requires=[
        "httpx>=0.27",
        "msgpack>=1.0",
        "cffi>=1.15",
        "pyfuse3>=3.2",
        "trio>=0.22",
        "zstandard>=0.21",
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "cryptography>=41"]},
    entry_points={"console_scripts": ["crfs = crfs_worker.cli:main"]},
    cmdclass={"build_py": BuildWithPlugin},
    zip_safe=False,
)
