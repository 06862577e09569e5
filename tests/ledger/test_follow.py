"""The continuous export: every durable record appended to a file, across restarts, rotation and errors.

Real homes, real SQLite files, a real output file and its state file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.home import Home
from appliance.ledger.follow import ExportFollower
from tests.ledger._exports import _append, _home, _lines, _seqs, _stored_lines, _verifier

# -- the follower -----------------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path: Path) -> Home:
    return _home(tmp_path, 5)


def _state(out: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(out.with_name(out.name + ".state").read_text())
    return result


def _assert_whole(home: Home, *files: Path) -> None:
    """Together the files hold every record once, in order, each line as stdout printed it."""
    lines = [line for path in files if path.exists() for line in _lines(path)]
    assert lines == _stored_lines(home)


def test_follower_catches_up_and_follows(small: Home, tmp_path: Path) -> None:
    out = tmp_path / "out" / "audit.jsonl"
    out.parent.mkdir()
    follower = ExportFollower(small.vault_path, out)
    assert follower.poll_once() == 5
    assert follower.poll_once() == 0
    _append(small, 3)
    assert follower.poll_once() == 3
    _assert_whole(small, out)
    assert _state(out) == {"seq": 8, "origin": _verifier(small).name}
    assert out.stat().st_mode & 0o777 == 0o640
    follower.stop()


def test_follower_batches_are_bounded(small: Home, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    follower = ExportFollower(small.vault_path, out, batch_lines=2)
    assert [follower.poll_once() for _ in range(4)] == [2, 2, 1, 0]
    _assert_whole(small, out)


def test_follower_resumes_without_duplicates(small: Home, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    ExportFollower(small.vault_path, out).poll_once()
    _append(small, 4)
    restarted = ExportFollower(small.vault_path, out)
    assert restarted.poll_once() == 4
    assert _seqs(out) == list(range(1, 10))
    # a state file that fell behind (written after the batch's fsync, so a crash can leave it so)
    out.with_name(out.name + ".state").write_text('{"seq": 3, "origin": null}')
    _append(small, 1)
    assert ExportFollower(small.vault_path, out).poll_once() == 1
    _assert_whole(small, out)


def test_a_torn_last_line_is_cut_and_rewritten(small: Home, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    ExportFollower(small.vault_path, out).poll_once()
    _append(small, 2)
    with out.open("a") as handle:
        handle.write(_stored_lines(small)[5][:37])  # a crash in the middle of writing line 6
    assert ExportFollower(small.vault_path, out).poll_once() == 2
    _assert_whole(small, out)


def test_rotation_by_rename(small: Home, tmp_path: Path) -> None:
    out, rotated = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    follower = ExportFollower(small.vault_path, out)
    follower.poll_once()
    out.rename(rotated)
    _append(small, 3)
    assert follower.poll_once() == 3
    assert _seqs(rotated) == [1, 2, 3, 4, 5] and _seqs(out) == [6, 7, 8]
    _assert_whole(small, rotated, out)


def test_rotation_while_stopped_uses_the_state_file(small: Home, tmp_path: Path) -> None:
    out, rotated = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    follower = ExportFollower(small.vault_path, out)
    follower.poll_once()
    follower.stop()
    out.rename(rotated)
    _append(small, 3)
    assert ExportFollower(small.vault_path, out).poll_once() == 3
    assert _seqs(out) == [6, 7, 8]
    _assert_whole(small, rotated, out)


def test_copytruncate(small: Home, tmp_path: Path) -> None:
    out, copied = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    follower = ExportFollower(small.vault_path, out)
    follower.poll_once()
    shutil.copyfile(out, copied)
    os.truncate(out, 0)
    _append(small, 3)
    assert follower.poll_once() == 3
    assert b"\x00" not in out.read_bytes()  # appended at the new end, not at the old offset
    assert _seqs(out) == [6, 7, 8]
    _assert_whole(small, copied, out)


def test_an_unwritable_output_is_retried(
    small: Home, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    out = exports / "audit.jsonl"
    follower = ExportFollower(small.vault_path, out)
    follower.poll_once()
    exports.rename(tmp_path / "exports.old")  # rotated away with its directory...
    exports.write_text("")  # ...and the path cannot hold a file now
    _append(small, 3)
    with caplog.at_level(logging.ERROR, "phi.audit_follow"):
        assert follower.poll_once() == 0
        assert follower.poll_once() == 0
    assert follower.last_error is not None and "NotADirectoryError" in follower.last_error
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 1  # said once, not every poll
    exports.unlink()
    exports.mkdir()
    assert follower.poll_once() == 3
    assert follower.last_error is None
    _assert_whole(small, tmp_path / "exports.old" / "audit.jsonl", out)


def test_a_batch_that_fails_half_written_resumes_after_its_last_whole_line(
    small: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "audit.jsonl"
    follower = ExportFollower(small.vault_path, out)
    follower.poll_once()
    _append(small, 4)
    real_write = ExportFollower._write_all

    def disk_full(self: ExportFollower, fd: int, data: bytes) -> None:
        cut = data.index(b"\n") + 1 + 20  # one whole line, then part of the next
        os.write(fd, data[:cut])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ExportFollower, "_write_all", disk_full)
    assert follower.poll_once() == 0
    assert follower.last_error is not None and "No space left" in follower.last_error
    assert _seqs(out) == [1, 2, 3, 4, 5, 6]  # the torn line was cut at once
    monkeypatch.setattr(ExportFollower, "_write_all", real_write)
    assert follower.poll_once() == 3
    _assert_whole(small, out)


def test_start_at_the_end(small: Home, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    assert ExportFollower(small.vault_path, out, start="end").poll_once() == 0
    assert _state(out)["seq"] == 5
    _append(small, 2)
    assert ExportFollower(small.vault_path, out, start="end").poll_once() == 2  # a restart keeps its place
    assert _seqs(out) == [6, 7]


def test_an_export_file_ahead_of_the_ledger_waits(
    small: Home, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "audit.jsonl"
    out.with_name(out.name + ".state").write_text('{"seq": 7, "origin": null}')
    follower = ExportFollower(small.vault_path, out)
    with caplog.at_level(logging.WARNING, "phi.audit_follow"):
        assert follower.poll_once() == 0
    assert "is ahead of the ledger (record 7, the ledger ends at 5)" in caplog.text
    _append(small, 3)
    assert follower.poll_once() == 1
    assert _seqs(out) == [8]


def test_a_state_file_of_another_ledger_is_refused(small: Home, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    out.with_name(out.name + ".state").write_text('{"seq": 2, "origin": "phi-gateway.elsewhere/node-z"}')
    follower = ExportFollower(small.vault_path, out)
    assert follower.poll_once() == 0
    assert (
        follower.last_error is not None
        and "belongs to the ledger of phi-gateway.elsewhere/node-z" in follower.last_error
    )
    assert out.read_text() == ""


def test_an_unreadable_ledger_is_retried(tmp_path: Path) -> None:
    home = Home(tmp_path / "later")
    out = tmp_path / "audit.jsonl"
    follower = ExportFollower(home.vault_path, out)
    assert follower.poll_once() == 0
    assert follower.last_error is not None and "OperationalError" in follower.last_error
    home.init(site="stmarys-main")
    assert follower.poll_once() == 1
    _assert_whole(home, out)


def test_follower_thread(small: Home, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    follower = ExportFollower(small.vault_path, out).start_thread(interval_s=0.01)
    _append(small, 3)
    deadline = time.monotonic() + 10
    while len(_seqs(out)) < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    _append(small, 2)
    follower.stop()  # what is durable at stop is written before it returns
    _assert_whole(small, out)
    assert not [t for t in threading.enumerate() if t.name == "audit-export"]
