"""Run import-linter on the `fleet` namespace.

import-linter finds packages on the file system, but the editable install maps folders to
`fleet.*` through an import hook it cannot see. This script lays the mapped folders out as a
real `fleet/` tree of symlinks in a temporary directory and runs `lint-imports` against it with
the contracts from pyproject.toml.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"core": "core", "controller": "controller", "agent": "agent", "cli": "cli", "proto": "proto"}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "fleet"
        pkg.mkdir()
        for name, folder in MAPPED.items():
            (pkg / name).symlink_to(ROOT / folder, target_is_directory=True)
        env = {**os.environ, "PYTHONPATH": tmp + os.pathsep + os.environ.get("PYTHONPATH", "")}
        return subprocess.call(["lint-imports", "--config", str(ROOT / "pyproject.toml")], cwd=tmp, env=env)


if __name__ == "__main__":
    sys.exit(main())
