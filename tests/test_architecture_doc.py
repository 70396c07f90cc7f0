"""docs/architecture.md matches the tree: every module it names exists, every module is named."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def _rows() -> dict[str, str]:
    """First-column path -> the rest of the row, for every table row naming a package folder or module."""
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\|\s*`([^`]+)`\s*\|(.*)\|\s*$", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_every_package_and_module_named_in_the_map_exists():
    rows = _rows()
    assert rows, "no table rows found in docs/architecture.md"
    for where, text in rows.items():
        assert (ROOT / where).exists(), f"docs/architecture.md names {where}, which does not exist"
        if where.endswith("/"):
            for module in re.findall(r"`([A-Za-z_]\w*\.(?:py|sh))", text):
                assert (ROOT / where / module).is_file(), f"docs/architecture.md names {where}{module}: missing"


def test_every_module_of_the_package_is_in_the_map():
    rows = _rows()
    named = {where for where in rows if where.endswith(".py")}
    for where, text in rows.items():
        if where.startswith("l2w_dist/") and where.endswith("/"):
            named |= {where + m for m in re.findall(r"`([A-Za-z_]\w*\.py)", text)}
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "l2w_dist").rglob("*.py") if p.name != "__init__.py"}
    missing = sorted(modules - named)
    assert not missing, f"modules absent from docs/architecture.md: {missing}"
