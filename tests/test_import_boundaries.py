"""The package boundaries a newcomer reads in the README, kept true.

- ``model`` is usable without any server: it imports neither ``service`` nor ``worker``.
- ``service.contract`` (job records, store, queue, result files, settings, metrics) is what the gateway
  and the worker share; it imports neither of them, nor FastAPI, nor torch.
- ``service.gateway`` imports the contract and, from ``model``, only the torch-free modules in
  :data:`GATEWAY_MODEL_MODULES`; never the worker, the command line or the client.
- ``service.client`` (the SDK) imports only the contract's schemas.
- ``worker`` imports the model and the contract, never the gateway, the command line or the client.
- ``service.cli`` composes everything, and imports each command's heavy parts only when it runs.

Imports are read from the source (including imports inside functions), so a lazy import cannot slip
past; another test runs the gateway and the command line in a fresh interpreter and checks what they
actually loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

GATEWAY_MODEL_MODULES = frozenset({"model.errors", "model.limits", "model.media"})
"""The torch-free part of ``model`` that the gateway may use: the rule set, its errors, and ffmpeg
probing of uploads."""

CONTRACT_MODEL_MODULES = frozenset({"model.errors", "model.limits"})
"""What the contract may use of ``model``: the rule set and its errors."""

RULES: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    # package: (forbidden import prefixes, the allowed exceptions among them)
    "model": (("service", "worker"), frozenset()),
    "service.contract": (
        (
            "service.gateway",
            "service.cli",
            "service.client",
            "worker",
            "model",
            "fastapi",
            "starlette",
            "torch",
        ),
        CONTRACT_MODEL_MODULES,
    ),
    "service.gateway": (("worker", "service.cli", "service.client", "model", "torch"), GATEWAY_MODEL_MODULES),
    "service.client": (
        ("service.gateway", "service.cli", "worker", "model", "torch", "fastapi"),
        frozenset(),
    ),
    "worker": (("service.gateway", "service.cli", "service.client"), frozenset()),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file; ``from a import b`` counts as ``a.b``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: use absolute imports"
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _owner(module: str) -> str | None:
    matches = [package for package in RULES if _under(module, package)]
    return max(matches, key=len) if matches else None


def crossings(path: Path) -> list[str]:
    """The imports of ``path`` that its package's rule forbids."""
    owner = _owner(_module_name(path))
    if owner is None:
        return []
    forbidden, allowed = RULES[owner]
    return sorted(
        name
        for name in _imports(path)
        if any(_under(name, prefix) for prefix in forbidden) and not any(_under(name, ok) for ok in allowed)
    )


SOURCES = sorted(path for top in ("model", "service", "worker") for path in (REPO / top).rglob("*.py"))


def test_every_source_file_has_a_rule() -> None:
    """Only the command line (which composes the others) and the ``service`` package file go unruled."""
    unruled = {_module_name(path) for path in SOURCES if _owner(_module_name(path)) is None}
    assert {name for name in unruled if not _under(name, "service.cli")} == {"service"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(REPO)))
def test_package_boundaries(path: Path) -> None:
    assert crossings(path) == [], f"{_owner(_module_name(path))} must not import these"


def test_a_forbidden_import_is_caught(tmp_path: Path) -> None:
    """The checker itself: a lazy import of the worker or the network in a gateway module is reported."""
    probe = REPO / "service" / "gateway" / f"_probe_{tmp_path.name}.py"
    probe.write_text("def f():\n    from worker.runner import JobRunner\n    from model import network\n")
    try:
        assert crossings(probe) == ["model.network", "worker.runner.JobRunner"]
    finally:
        probe.unlink()


def test_gateway_and_command_line_load_neither_torch_nor_the_worker() -> None:
    code = (
        "import sys\n"
        "from service.gateway.app import create_app\n"
        "from service.cli.main import build_parser\n"
        "from service.contract.settings import Settings\n"
        "import service.client\n"
        f"import {', '.join(sorted(GATEWAY_MODEL_MODULES))}\n"
        "create_app(Settings())\n"
        "build_parser()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('worker.') and m != 'worker.cli')\n"
        "assert not loaded, f'the worker was imported: {loaded}'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
