"""The README's configuration table is the settings list in app/config.py, row for row."""

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
