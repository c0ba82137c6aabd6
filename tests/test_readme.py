"""The documentation stays true to the code: every setting documented (docs/settings.md), every page the
README links to exists, and CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

from service.contract.settings import Settings

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SETTINGS_PAGE = (REPO / "docs" / "settings.md").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the quick start has no bash block"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_is_exactly_two_commands_and_ci_runs_the_test_one() -> None:
    commands = quick_start_commands()
    assert commands == ["make up", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M), ".ci/run must call the README's test command unchanged"


def test_every_setting_is_documented_with_its_default() -> None:
    missing = []
    for name, field in Settings.model_fields.items():
        row = re.search(rf"^\| `UNIVIGU_{name.upper()}` \| (.*?) \|", SETTINGS_PAGE, re.M)
        if row is None:
            missing.append(name)
            continue
        default = field.default_factory() if field.default_factory else field.default
        shown = row.group(1)
        if default not in (None, [], "") and str(default) not in shown:
            missing.append(f"{name} (default {default!r}, docs/settings.md says {shown!r})")
    assert not missing, f"settings missing from the table in docs/settings.md: {missing}"


def test_every_linked_page_exists() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = [
        f"{page.name}: {target}"
        for page in pages
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", page.read_text())
        if not (page.parent / target).is_file()
    ]
    assert not broken, broken
