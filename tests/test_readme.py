"""The README's configuration table is the settings list in app/config.py, row for row, and
every test its "Guarantees" section names exists."""

import re
from pathlib import Path

from app.config import DOCUMENTED_SETTINGS

README = Path(__file__).resolve().parent.parent / "README.md"


def configuration_table() -> str:
    rows = ["| variable | default | what it sets |", "|---|---|---|"]
    rows += [
        f"| `{name}` | {default} | {meaning} |" for name, default, meaning in DOCUMENTED_SETTINGS
    ]
    return "\n".join(rows)


def test_readme_lists_every_setting():
    assert configuration_table() in README.read_text(), (
        "README.md's configuration table is out of step with app/config.py; regenerate it with "
        "`python -c 'from tests.test_readme import configuration_table as t; print(t())'`"
    )


def test_every_test_the_guarantees_name_exists():
    text = README.read_text()
    section = text[text.index("## Guarantees") : text.index("## Configuration")]
    root = README.parent
    named = 0
    for cell in section.split("|"):
        current = None
        # `tests/x.py`, `tests/x.py::test_name`, and `::test_name` (same file as the last one).
        for path, name in re.findall(r"`(tests/[\w/]+(?:\.py)?/?)?(?:::(\w+))?`", cell):
            if path:
                current = root / path
                assert current.exists(), path
            if name:
                assert current is not None and current.is_file(), name
                assert re.search(rf"^def {name}\(", current.read_text(), re.M), (current, name)
                named += 1
    assert named >= 15
