"""The demo (the README's first command) runs end to end with real processes and passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def test_quick_demo_passes_every_check(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    result = run("-m", "eventlog._demo", "--quick", "--dir", str(demo))
    out = result.stdout
    assert result.returncode == 0, f"exit {result.returncode}\n{out}\n{result.stderr}"
    assert "SIGKILL billing consumer pid" in out
    assert "failover in" in out
    assert "could not convert string to float: '12,50'" in out
    assert "re-delivered 600 events" in out
    for row in (
        "appended",
        "delivered, billing",
        "delivered, audit",
        "duplicates, billing",
        "dead-lettered, billing",
        "dead-lettered, audit",
        "lag, billing",
        "lag, audit",
        "audit replay, re-delivered",
    ):
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(row)), None)
        assert line is not None, f"no {row!r} row in the table:\n{out}"
        assert line.rstrip().endswith(" ok"), line
    assert "FAILED" not in out
    assert "all checks hold" in out
    # --dir keeps the folder: the log, the dead-letter file and the journals are there
    assert (demo / "demo.db").exists()
    assert (demo / "demo.db.deadletter.jsonl").read_text().count("\n") == 3
    assert sorted(p.name for p in demo.glob("journal-*.jsonl")) == [
        "journal-audit-1.jsonl",
        "journal-audit-replay.jsonl",
        "journal-billing-1.jsonl",
        "journal-billing-2.jsonl",
        "journal-billing-3.jsonl",
    ]


def test_demo_refuses_a_folder_that_holds_a_demo(tmp_path: Path) -> None:
    (tmp_path / "demo.db").write_bytes(b"")
    result = run("-m", "eventlog._demo", "--quick", "--dir", str(tmp_path), timeout=30)
    assert result.returncode == 2
    assert "already holds a demo" in result.stdout


def test_example_script_passes_arguments_through(tmp_path: Path) -> None:
    result = run(str(ROOT / "scripts" / "example.py"), "--help", timeout=30)
    assert result.returncode == 0
    assert "--quick" in result.stdout and "--dir" in result.stdout


def test_journal_counting() -> None:
    from eventlog._demo import Deliveries

    def line(offset: int, partition: int, result: str = "ok", pid: int = 1) -> dict[str, object]:
        return {"o": offset, "p": partition, "r": result, "pid": pid}

    got = Deliveries(
        [
            line(1, 0),
            line(2, 1),
            line(3, 1, "raise"),
            line(3, 1, "raise"),
            line(2, 1, pid=2),  # redelivered after pid 1 died
            line(4, 0, pid=2),
        ]
    )
    assert got.offsets == {1, 2, 3, 4}
    assert got.duplicates == 1  # failed attempts are not duplicates
    assert got.duplicate_partitions() == {1}
    assert got.in_order()
    assert not Deliveries([line(5, 0), line(4, 0)]).in_order()


def test_a_demo_out_of_time_fails_and_leaves_no_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses
    import io

    from eventlog import _demo

    monkeypatch.setattr(_demo, "QUICK", dataclasses.replace(_demo.QUICK, budget_s=0.5))
    out = io.StringIO()
    assert _demo.run_demo(tmp_path, quick=True, out=out) == 1
    text = out.getvalue()
    assert "FAILED: gave up after" in text
    assert "SOME CHECKS FAILED" in text
    left = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(tmp_path).encode() in cmdline and b"_demo_worker" in cmdline:
                left.append(pid)
    assert not left, f"demo workers still running: {left}"
