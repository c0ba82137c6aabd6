"""The gateway must never import torch, directly or transitively."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_gateway_and_cli_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from service.app import create_app\n"
        "from service.cli import build_parser\n"
        "from service.settings import Settings\n"
        "create_app(Settings())\n"
        "build_parser()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'worker' not in sys.modules, 'the worker package was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
