"""The README and docs/ say what the code does: the test command and the settings table."""

import re
from pathlib import Path

from kvapp.config import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ")]


def test_quick_start_has_exactly_two_commands():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("-m kvapp serve")
    assert commands[1].endswith("-m pytest -n 2")


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert quick_start_commands()[1] in ci.splitlines()


def test_every_setting_is_documented_with_its_default():
    rows = dict(re.findall(r"^\| `(\w+)` \| `\[\w+\]` \| `([^`]*)` \|", CONFIGURATION, re.M))
    for _section, name, _convert, default, _help in SETTINGS:
        assert name in rows, f"docs/configuration.md's settings table lacks {name}"
        assert rows[name] == default, (
            f"docs/configuration.md gives {name} = {rows[name]!r}, the code {default!r}"
        )
