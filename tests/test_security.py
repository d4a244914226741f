"""Security on one host: owner-only files, parameterised SQL, and no file outside the
database's folder and its sidecar whatever a topic, group or dead-letter id contains.

- The database, its -wal/-shm, the sidecar folder and everything in it, and the dead-letter
  file are created readable and writable by the owner only, whatever the umask (a stricter
  umask only narrows them). Checked in a child process, so the umask is its own.
- Every statement eventlog runs is a named constant or built from constants; values are `?`
  parameters. Checked on the source (AST) and by storing SQL-looking text.
- Names are validated before they reach a path or a statement: `../`, absolute paths and
  separators are refused with InvalidName, and the folder tree is compared before and after.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

import eventlog

PACKAGE = Path(eventlog.__file__).resolve().parent

# -- owner-only files -------------------------------------------------------------------------

EXERCISE = textwrap.dedent(
    """
    import asyncio, json, os, stat, sys
    os.umask(int(sys.argv[2], 8))
    import eventlog

    async def main(db):
        async with eventlog.open(db) as log:
            await log.create_topic("orders", 2)
            for i in range(4):
                await log.append("orders", {"i": i, "poison": i == 1}, key=f"k{i}")

            def handler(event):
                if event.payload["poison"]:
                    raise ValueError("poison")

            consumer = log.consumer("billing", "orders", handler, max_attempts=1,
                                    retry_backoff=0.01)
            task = asyncio.create_task(consumer.run(handle_signals=False))
            for _ in range(400):
                if (await log.dead_letters()).entries:
                    break
                await asyncio.sleep(0.025)
            # a member lock, lane locks, a wake socket and the dead-letter lock exist now
            tree = snapshot(os.path.dirname(db))
            consumer.stop()
            await asyncio.wait_for(task, 20)
            await log.requeue_dead_letters(all=True)  # rewrites the file via a temporary
        tree.update(snapshot(os.path.dirname(db)))
        return tree

    def snapshot(folder):
        found = {}
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = os.path.join(root, name)
                found[os.path.relpath(path, folder)] = stat.S_IMODE(os.lstat(path).st_mode)
        return found

    print(json.dumps(asyncio.run(main(sys.argv[1]))))
    """
)


@pytest.mark.parametrize("umask", ["022", "077", "000", "027"])
def test_every_file_and_folder_is_owner_only_whatever_the_umask(tmp_path: Path, umask: str) -> None:
    db = tmp_path / "app.db"
    proc = subprocess.run([sys.executable, "-c", EXERCISE, str(db), umask], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    modes: dict[str, int] = json.loads(proc.stdout)
    for required in ("app.db", "app.db.d", "app.db.deadletter.jsonl", "app.db.d/write.lock",
                     "app.db.d/wake", "app.db.d/groups/billing/members"):  # fmt: skip
        assert required in modes, sorted(modes)
    assert any(p.startswith("app.db.d/groups/billing/lanes/") for p in modes)
    assert any(p.startswith("app.db.d/groups/billing/members/") for p in modes), sorted(modes)
    assert any(p.startswith("app.db.d/wake/") and p.endswith(".sock") for p in modes)
    loose = {p: oct(m) for p, m in modes.items() if m & 0o077}
    assert not loose, f"readable or writable by others with umask {umask}: {loose}"
    too_wide = {p: oct(m) for p, m in modes.items() if m & ~0o700}
    assert not too_wide, too_wide
    stricter = int(umask, 8)
    assert not {p for p, m in modes.items() if m & stricter}, "a stricter umask was widened"


# -- parameterised SQL ------------------------------------------------------------------------

# The only place a statement is formatted at run time: the connection PRAGMAs, filled with
# an int (busy_timeout) and a checked keyword ("FULL" or "NORMAL"); PRAGMA takes no `?`.
ALLOWED_FORMAT = {("_db.py", "connect")}
SQL_CALLS = {"execute", "executemany", "executescript"}


def constant_text(node: ast.AST) -> bool:
    """A string built only from literals and names (module constants), never from values
    computed at run time by formatting."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.Name | ast.Attribute):
        return True
    if isinstance(node, ast.Subscript):  # one of a module's constant statements, chosen
        return isinstance(node.value, ast.Name | ast.Attribute)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return constant_text(node.left) and constant_text(node.right)
    if isinstance(node, ast.IfExp):
        return constant_text(node.body) and constant_text(node.orelse)
    return False


class SqlCalls(ast.NodeVisitor):
    """Every execute/executemany/executescript/Stmt call, with its enclosing function."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.scope = ["<module>"]
        self.problems: list[str] = []

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in SQL_CALLS or name == "Stmt":
            args = list(node.args[:1]) + [k.value for k in node.keywords if k.arg == "sql"]
            for arg in args:
                formatted = (
                    isinstance(arg, ast.Call)
                    and isinstance(arg.func, ast.Attribute)
                    and arg.func.attr == "format"
                )
                if formatted and (self.path.name, self.scope[-1]) in ALLOWED_FORMAT:
                    continue
                if not constant_text(arg):
                    self.problems.append(
                        f"{self.path.name}:{node.lineno} in {self.scope[-1]}: {ast.unparse(arg)}"
                    )
        self.generic_visit(node)


def sql_argument_problems(path: Path) -> list[str]:
    visitor = SqlCalls(path)
    visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return visitor.problems


def test_every_statement_is_a_constant_and_values_are_parameters() -> None:
    problems = []
    for path in sorted(PACKAGE.glob("*.py")):
        problems += sql_argument_problems(path)
    assert not problems, "SQL built from run-time values:\n" + "\n".join(problems)


def test_the_statement_check_tells_formatted_sql_from_chosen_constants(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f(conn, name, i):\n"
        "    conn.execute(_sql.SELECT_ONE, (name,))\n"
        "    conn.execute(_sql.SHAPES[i * 2 + 1], (name,))\n"
        "    conn.execute(f'SELECT * FROM {name}')\n"
        "    conn.execute('SELECT ' + name.upper())\n"
        "    conn.execute('SELECT {}'.format(name))\n"
        "    conn.execute(shapes_for(name)[i])\n",
        encoding="utf-8",
    )
    assert [p.split(":")[1].split()[0] for p in sql_argument_problems(sample)] == [
        "4",
        "5",
        "6",
        "7",
    ]


def test_sql_constants_are_plain_text_with_placeholders() -> None:
    from eventlog import _sql

    for name, value in vars(_sql).items():
        if not name.isupper() or name == "PRAGMAS":  # PRAGMAS: checked below
            continue
        # a tuple holds one statement per shape (chosen by index in the code, see above)
        for text in value if isinstance(value, tuple) else [value]:
            if isinstance(text, str):
                assert "{" not in text and "%s" not in text, f"_sql.{name} is a template"
    for pragma in _sql.PRAGMAS:  # the one template: filled by _db.connect with checked values
        filled = pragma.replace("{busy_timeout_ms}", "0").replace("{synchronous}", "FULL")
        assert re.fullmatch(r"PRAGMA [a-z_]+ = [A-Za-z0-9]+", filled), pragma


def test_sql_looking_values_are_stored_as_data(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    nasty = "x'); DROP TABLE eventlog_events; --"
    with eventlog.open_sync(db) as log:
        offset = log.append("t", {nasty: nasty}, key=nasty, headers={nasty: nasty},
                            dedupe_key=nasty)  # fmt: skip
        event = log.get(offset)
        assert event is not None and event.payload == {nasty: nasty} and event.key == nasty
        assert log.append("t", 1, dedupe_key=nasty) == offset
    conn = sqlite3.connect(db)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
        assert "eventlog_events" in tables
        assert conn.execute("SELECT key, dedupe_key FROM eventlog_events").fetchall() == [
            (nasty, nasty)
        ]
    finally:
        conn.close()


# -- no file outside the database's folder and its sidecar ------------------------------------


def hostile_names(outside: Path) -> list[str]:
    return [
        "../escape", "../../escape", "a/../../escape", "a/b", "..", ".", str(outside),
        str(outside / "file"), "/etc/passwd", "~root", "a\\..\\b", "a\x00b", "escape~0",
        "a/.", " ", "groups/../../x", "%2e%2e%2fescape",
    ]  # fmt: skip


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def refused(call: Any) -> type[BaseException] | None:
    try:
        call()
    except eventlog.EventlogError as exc:
        return type(exc)
    return None


def test_hostile_names_are_refused_and_write_nothing_outside(tmp_path: Path) -> None:
    outer = tmp_path / "outer"
    data = outer / "data"
    data.mkdir(parents=True)
    outside = tmp_path / "target"
    db = data / "app.db"

    async def async_checks() -> None:
        async with eventlog.open(db) as alog:
            for name in hostile_names(outside):
                with pytest.raises(eventlog.InvalidName):
                    alog.consumer(name, "ok", lambda e: None)
                with pytest.raises(eventlog.InvalidName):
                    await alog.append(name, 1)

    with eventlog.open_sync(db) as log:
        log.append("ok", 1)
        before = tree(outer)
        for name in hostile_names(outside):
            checks = {
                "append": lambda n=name: log.append(n, 1),
                "create_topic": lambda n=name: log.create_topic(n, 2),
                "read": lambda n=name: list(log.read(n)),
                "group_positions": lambda n=name: log.group_positions(n),
                "group_members": lambda n=name: log.group_members(n),
                "delete_group": lambda n=name: log.delete_group(n),
                "consume": lambda n=name: log.consume(n, "ok", lambda e: None),
                "dead_letters": lambda n=name: log.dead_letter(n),
                "requeue": lambda n=name: log.requeue_dead_letters([n]),
                "purge": lambda n=name: log.purge_dead_letters([n]),
                "requeue_by_group": lambda n=name: log.requeue_dead_letters(group=n),
                "purge_by_group": lambda n=name: log.purge_dead_letters(group=n),
                "list_by_group": lambda n=name: log.dead_letters(group=n),
                "list_by_topic": lambda n=name: log.dead_letters(topic=n),
            }
            for what, call in checks.items():
                kind = refused(call)
                assert kind is not None and issubclass(kind, eventlog.InvalidArgument), (
                    what, name, kind)  # fmt: skip
        asyncio.run(async_checks())
        assert tree(outer) == before, tree(outer) ^ before
    assert not outside.exists()
    assert not (tmp_path / "escape").exists() and not (outer / "escape").exists()
    allowed_top = {"app.db", "app.db-wal", "app.db-shm", "app.db.d", "app.db.deadletter.jsonl"}
    assert {p.split(os.sep)[0] for p in tree(data)} <= allowed_top


def test_consumers_write_only_inside_the_sidecar(tmp_path: Path) -> None:
    """Valid names made of dots, dashes and underscores map to paths inside the sidecar."""
    outer = tmp_path / "outer"
    data = outer / "data"
    data.mkdir(parents=True)
    db = data / "app.db"
    with eventlog.open_sync(db) as log:
        for topic in ("a.b", "-", "_", "a-b.c_d"):
            log.create_topic(topic, 2)
            log.append(topic, {"t": topic})
        done = threading.Event()
        seen: list[int] = []

        def handler(event: eventlog.Event) -> None:
            seen.append(event.offset)
            if len(seen) >= 4:
                done.set()

        for group in ("g.h", "-", "x_y-z"):
            seen.clear()
            done.clear()
            deadline = threading.Timer(20, done.set)
            deadline.start()
            try:
                log.consume(group, "#", handler, stop=done, handle_signals=False)
            finally:
                deadline.cancel()
            assert len(seen) >= 4
    outside = {p for p in tree(outer) if not p.startswith("data")}
    assert not outside, outside
    top = {p.split(os.sep)[1] for p in tree(outer) if p.startswith("data" + os.sep)}
    assert top <= {"app.db", "app.db-wal", "app.db-shm", "app.db.d", "app.db.deadletter.jsonl"}
    groups = {p.split(os.sep)[2] for p in tree(data) if p.startswith("app.db.d/groups/")}
    assert groups == {"g.h", "-", "x_y-z"}
    for path in (data / "app.db.d").rglob("*"):
        assert path.resolve().is_relative_to((data / "app.db.d").resolve())
        if path.is_symlink():
            pytest.fail(f"unexpected symlink {path}")
    assert stat.S_IMODE((data / "app.db.d").stat().st_mode) == 0o700
