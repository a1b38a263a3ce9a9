"""docs/design.md and README.md stay true about the tree: modules, settings, commands, the event's path.

Cheap checks against the code itself, so the docs cannot drift silently (they listed nine modules that
had moved and a command that never existed before these tests).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer.main

from meterline.cli import app
from meterline.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DESIGN = (ROOT / "docs" / "design.md").read_text()
README = (ROOT / "README.md").read_text()
PACKAGES = ("meterline", "ingest", "processor", "query")


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def modules_in_tree() -> set[str]:
    return {
        str(p.relative_to(ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }


def modules_in_layout() -> list[str]:
    layout = section(DESIGN, "## Processes and packages")
    block = layout[layout.index("```"):layout.rindex("```")]
    return re.findall(r"^\s+((?:meterline|ingest|processor|query)/[\w/]+\.py)\b", block, re.MULTILINE)


def test_layout_lists_every_module_once_and_nothing_else() -> None:
    listed = modules_in_layout()
    assert len(listed) == len(set(listed)), "a module is listed twice"
    missing = modules_in_tree() - set(listed)
    stale = set(listed) - modules_in_tree()
    assert not missing, f"docs/design.md 'Processes and packages' omits {sorted(missing)}"
    assert not stale, f"docs/design.md 'Processes and packages' lists modules that do not exist: {sorted(stale)}"


def test_settings_section_names_every_field() -> None:
    text = section(DESIGN, "## Settings (meterline/settings.py)")
    aliases = {"config_file": "METERLINE_CONFIG", "meters_raw": "meters"}
    missing = [f for f in Settings.model_fields if f"`{aliases.get(f, f)}" not in text]
    assert not missing, f"docs/design.md's Settings section does not mention {missing}"


def commands() -> dict[str, set[str]]:
    """Top-level commands of `meterline`, each with its subcommands (empty for a plain command)."""
    root: Any = typer.main.get_command(app)  # a TyperGroup (typer vendors its own click)
    return {name: set(getattr(cmd, "commands", ())) for name, cmd in root.commands.items()}


def invocations(text: str) -> list[tuple[str, str | None]]:
    """`meterline <command> [<sub>]` at the start of a code span or code-block line."""
    code = re.findall(r"`([^`\n]+)`", text)
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.DOTALL):
        code += block.splitlines()
    found = []
    for snippet in code:
        m = re.match(r"\s*(?:[A-Z_]+=\S+\s+)*(?:\S*/)?meterline ([a-z][a-z-]*)(?: ([a-z][a-z|-]*))?", snippet)
        if m:
            found.append((m[1], m[2]))
    return found


@pytest.mark.parametrize("doc", ["README.md", "docs/design.md"])
def test_documented_commands_exist(doc: str) -> None:
    real = commands()
    used = invocations((ROOT / doc).read_text())
    assert used, f"{doc} shows no meterline command"
    for name, sub in used:
        assert name in real, f"{doc} shows `meterline {name}`, which does not exist (commands: {sorted(real)})"
        if real[name] and sub is not None:
            for part in sub.split("|"):
                assert part in real[name], f"{doc} shows `meterline {name} {part}`, which does not exist"


def test_cli_line_of_the_layout_names_every_command() -> None:
    (line,) = [x for x in section(DESIGN, "## Processes and packages").splitlines() if "meterline/cli.py" in x]
    real = commands()
    missing = [name for name in real if name not in line]
    assert not missing, f"docs/design.md's meterline/cli.py line omits {missing}"
    words = re.findall(r"[a-z][a-z-]+", line.split("meterline/cli.py", 1)[1])
    known = set(real).union(*real.values())
    assert not [w for w in words if w not in known], f"docs/design.md's cli line names unknown commands: {words}"


def test_readme_follow_one_event_names_real_files_in_a_few_steps() -> None:
    paragraph = README[README.index("Follow one event:"):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    steps = paragraph.split("→")
    paths = re.findall(r"`([\w/.]+)`", paragraph)
    assert 4 <= len(steps) <= 10 and paths
    absent = [p for p in paths if not (ROOT / p).exists()]
    assert not absent, f"README's 'Follow one event' names files that do not exist: {absent}"


@pytest.mark.parametrize("doc", ["README.md", "docs/design.md"])
def test_every_file_a_doc_names_exists(doc: str) -> None:
    text = (ROOT / doc).read_text()
    named = set(re.findall(r"\b(?:meterline|ingest|processor|query|tests|bench|deploy)/[\w/.-]+\.(?:py|yaml|md)\b", text))
    absent = sorted(p for p in named if not (ROOT / p).exists())
    assert not absent, f"{doc} names files that do not exist: {absent}"
