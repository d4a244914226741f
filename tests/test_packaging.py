"""The wheel ships the migrations: built with `pip wheel`, the .sql files are inside under
eventlog/migrations/, and the unpacked package finds and applies them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# pip's words for "could not fetch the build backend": only then is the test skipped.
OFFLINE_SIGNS = (
    "No matching distribution found for setuptools",
    "Could not find a version that satisfies the requirement setuptools",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a copy: building writes build/ and egg-info beside the sources
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    for folder in ("eventlog", "migrations"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    out = work / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-input",
         "--disable-pip-version-check", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300, cwd=work,
    )  # fmt: skip
    if result.returncode != 0:
        output = result.stdout + result.stderr
        if any(sign in output for sign in OFFLINE_SIGNS):
            pytest.skip("pip wheel could not fetch the build backend (offline)")
        raise AssertionError(f"pip wheel failed:\n{output[-4000:]}")
    (built,) = out.glob("eventlog-*.whl")
    return built


def test_wheel_contains_every_migration_and_py_typed(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"eventlog/migrations/{p.name}" for p in (ROOT / "migrations").glob("*.sql")}
    assert expected, "no migrations in the source tree"
    assert expected <= names, f"missing from the wheel: {expected - names}"
    assert "eventlog/migrations/__init__.py" in names
    assert "eventlog/py.typed" in names
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "eventlog").rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel: {modules - names}"
    assert not any("__pycache__" in n or n.startswith("tests/") for n in names)


def test_unpacked_wheel_finds_and_applies_its_migrations(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = textwrap.dedent(f"""
        import sqlite3, eventlog
        from eventlog import _db
        assert eventlog.__file__.startswith({str(site)!r}), eventlog.__file__
        versions = [m.version for m in _db.load_migrations()]
        with eventlog.open_sync({str(tmp_path / "app.db")!r}) as log:
            log.append("t", 1)
        conn = sqlite3.connect({str(tmp_path / "app.db")!r})
        recorded = [v for (v,) in conn.execute("SELECT version FROM eventlog_schema")]
        conn.close()
        assert versions and recorded == versions, (versions, recorded)
        print("ok", versions)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
