"""The README and the command line's help cannot drift from what exists."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer.main

from eventlog.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def is_group(command: Any) -> bool:
    return hasattr(command, "list_commands")  # typer may carry its own copy of click


def verbs() -> Iterator[tuple[str, Any]]:
    root = typer.main.get_command(app)
    stack: list[tuple[str, Any]] = [("", root)]
    while stack:
        path, command = stack.pop()
        if is_group(command):
            ctx = command.context_class(command)
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None
                stack.append((f"{path} {name}".strip(), sub))
        if path:
            yield path, command


def test_every_verb_has_help_with_an_example() -> None:
    found = dict(verbs())
    assert {"init", "append", "tail", "replay", "dlq requeue", "serve"} <= set(found)
    for path, command in found.items():
        text = command.help or ""
        assert text.strip(), f"'eventlog {path}' has no help"
        if not is_group(command):
            assert "eventlog" in text, f"'eventlog {path}' --help shows no example"


def test_every_verb_is_in_the_readme() -> None:
    for path, _ in verbs():
        assert re.search(rf"eventlog(\s+--?\S+(\s+\S+)?)*\s+{re.escape(path)}\b", README) or (
            f"`{path}`" in README
        ), f"README never mentions 'eventlog {path}'"


def test_tests_named_by_the_readme_exist() -> None:
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", README)
    assert len(named) > 10
    for file, test in named:
        path = ROOT / file
        assert path.exists(), f"README names {file}, which does not exist"
        if test:
            tree = ast.parse(path.read_text(encoding="utf-8"))
            functions = {
                node.name
                for node in ast.walk(tree)
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            }
            assert test in functions, f"README names {file}::{test}, which does not exist"


def test_readme_starts_with_the_two_commands() -> None:
    first_block = README.split("```", 2)[1]
    assert "scripts/demo.sh" in first_block and "scripts/test.sh" in first_block
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "scripts/test.sh" in ci
