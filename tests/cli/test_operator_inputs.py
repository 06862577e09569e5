"""Files and values an operator hands the command line, at their worst: a FIFO, /dev/zero, a directory, a
file over its cap, dates out of datetime's range. Each ends in ``error: …`` and exit 1, never a hang, a
traceback or a MemoryError.

The hangs and the endless reads run in a child process with a timeout and a memory limit, so that the
code before the fix fails these tests instead of stalling or exhausting the machine.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance import files
from appliance.cli import main
from appliance.errors import OperatorError
from appliance.policy import dsse
from appliance.signing_keys import load_signing_key
from tests.cli.test_cli import _bundle, _run, _setup
from tests.support.gateway import policy_doc

_REPO = Path(__file__).resolve().parents[2]
_HANG_S = 30


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # an endless read dies, not the machine


def _child(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m appliance ARGS`` in a child with a deadline and 2 GiB of address space."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI_")}
    try:
        return subprocess.run(
            [sys.executable, "-m", "appliance", *args],
            capture_output=True,
            text=True,
            timeout=_HANG_S,
            cwd=_REPO,
            env=env,
            preexec_fn=_limited,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"phi-gateway {' '.join(args)} hung for {_HANG_S} s")


def _refused(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: "), done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr


def test_policy_verify_of_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    home, _ = _setup(tmp_path)
    fifo = tmp_path / "bundle.fifo"
    os.mkfifo(fifo)
    _refused(_child("policy", "verify", str(fifo), "--home", str(home)), "not a regular file", "a FIFO")


def test_policy_import_of_dev_zero_is_refused(tmp_path: Path) -> None:
    home, _ = _setup(tmp_path)
    _refused(
        _child("policy", "import", "/dev/zero", "--home", str(home)), "not a regular file", "character device"
    )


def test_policy_sign_with_a_fifo_key_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "policy.json"
    source.write_text(json.dumps(policy_doc("http://127.0.0.1:9")))
    fifo = tmp_path / "author.key.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out.bundle"
    _refused(_child("policy", "sign", str(source), "--key", str(fifo), "--out", str(out)), "a FIFO")
    assert not out.exists()


def test_trust_add_of_a_fifo_is_refused(tmp_path: Path) -> None:
    home, _ = _setup(tmp_path)
    fifo = tmp_path / "key.pub"
    os.mkfifo(fifo)
    _refused(_child("trust", "add", str(fifo), "--home", str(home)), "a FIFO")


def test_a_fifo_in_place_of_the_master_key_is_refused(tmp_path: Path) -> None:
    home, _ = _setup(tmp_path)
    (home / "master.key").unlink()
    os.mkfifo(home / "master.key", 0o600)
    _refused(_child("keys", "list", "--home", str(home)), "master.key", "a FIFO")


def test_audit_verify_proof_of_dev_zero_is_refused(tmp_path: Path) -> None:
    _refused(_child("audit", "verify-proof", "/dev/zero", "--key", "x+1+AQ"), "character device")


def test_audit_verify_with_a_fifo_checkpoint_is_refused(tmp_path: Path) -> None:
    home, _ = _setup(tmp_path)
    fifo = tmp_path / "kept.checkpoint"
    os.mkfifo(fifo)
    _refused(_child("audit", "verify", "--checkpoint", str(fifo), "--home", str(home)), "a FIFO")


def test_audit_verify_of_an_export_beside_a_fifo_sidecar_is_refused(tmp_path: Path) -> None:
    home, _ = _setup(tmp_path)
    key = _run("audit", "key", "--home", str(home)).stdout.strip()
    export = tmp_path / "export.jsonl"
    export.write_text("")
    os.mkfifo(tmp_path / "export.jsonl.prefix.json")
    (tmp_path / "export.jsonl.checkpoint").write_text("")
    _refused(_child("audit", "verify", str(export), "--key", key), "prefix.json", "a FIFO")


def test_import_cllama_with_a_fifo_metadata_is_refused(tmp_path: Path) -> None:
    home, _ = _setup(tmp_path)
    agent = tmp_path / "context" / "bot-1"
    agent.mkdir(parents=True)
    os.mkfifo(agent / "metadata.json")
    args = ["token", "import-cllama", str(agent.parent), "--org", "o", "--role", "r", "--allow-unknown-role"]
    _refused(_child(*args, "--home", str(home)), "metadata.json", "a FIFO")


def test_an_oversized_bundle_is_refused_naming_the_cap(tmp_path: Path) -> None:
    home, _ = _setup(tmp_path)
    big = tmp_path / "big.bundle"
    big.write_bytes(b" " * (2 << 20))
    refused = _run("policy", "import", str(big), "--home", str(home), ok=False)
    assert refused.exit_code == 1
    assert "too large for a policy bundle" in refused.output and "cap of 1 MiB" in refused.output


def test_a_directory_is_refused_by_the_reader(tmp_path: Path) -> None:
    with pytest.raises(OperatorError, match="is not a regular file \\(a directory\\); expected a proof"):
        files.read_bytes(tmp_path, files.Input("proof", 1024))


def test_a_file_growing_past_its_cap_while_read_is_refused(tmp_path: Path) -> None:
    """The cap holds on the bytes read, not only on the size fstat saw (here: a file over it from the start
    is caught by fstat; a device reports size 0, which only the read-side count can catch)."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 2048)
    with pytest.raises(OperatorError, match="2048 bytes, over the cap of 1 KiB"):
        files.read_bytes(path, files.Input("key file", 1024))
    assert files.read_bytes(path, files.Input("key file", 2048)) == b"x" * 2048


def _signed(tmp_path: Path, author: Path, **dates: object) -> Path:
    """A bundle whose payload has ``dates`` in it, signed as is (``policy sign`` would refuse it)."""
    doc = policy_doc("http://127.0.0.1:9", scope={"sites": ["stmarys-main"]})
    doc.update(dates)
    payload = json.dumps(doc).replace('"__1e400__"', "1e400").encode()
    bundle = tmp_path / "dates.bundle"
    bundle.write_bytes(dsse.sign(payload, [load_signing_key(Path(f"{author}.key"))]))
    return bundle


@pytest.mark.parametrize(
    "dates",
    [
        {"issued_at": "9999-99-99T00:00:00Z"},
        {"issued_at": "0000-01-01T00:00:00Z"},
        {"issued_at": "10000-01-01T00:00:00Z"},
        {"expires_at": "__1e400__"},
        {"expires_at": "9999-12-31T23:59:59-23:59"},  # in range as written, past year 9999 in UTC
        {"issued_at": "0001-01-01T00:00:00+01:00"},  # before year 1 in UTC
        {"expires_at": "9999-12-31T23:59:59Z"},  # in range, but no room left for a duration added to it
    ],
    ids=["month-99", "year-0", "year-10000", "1e400", "overflow-up", "overflow-down", "year-9999"],
)
def test_out_of_range_dates_in_a_bundle_are_a_one_line_error(
    tmp_path: Path, dates: dict[str, object]
) -> None:
    home, author = _setup(tmp_path)
    bundle = _signed(tmp_path, author, **dates)
    for verb in ("verify", "import"):
        result = CliRunner().invoke(main, ["policy", verb, str(bundle), "--home", str(home)])
        assert isinstance(result.exception, SystemExit) and result.exit_code == 1, (
            result.exception,
            result.output,
        )
        assert result.output.startswith("error: bundle rejected (schema)"), result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    source = tmp_path / "dates.json"
    source.write_bytes(dsse.parse_envelope(bundle.read_bytes()).payload)
    signed = CliRunner().invoke(main, ["policy", "sign", str(source), "--key", f"{author}.key", "--out", "x"])
    assert isinstance(signed.exception, SystemExit) and signed.exit_code == 1, signed.exception
    assert "is not a valid policy" in signed.output


@pytest.mark.parametrize(
    "expires",
    ["3000000d", "99999999999999999999d", "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+01:00"],
)
def test_out_of_range_token_expiry_is_a_one_line_error(tmp_path: Path, expires: str) -> None:
    home, author = _setup(tmp_path)
    _run("policy", "import", str(_bundle(tmp_path, author)), "--home", str(home))
    args = ["token", "issue", "--caller", "bot", "--org", "stmarys", "--role", "radiology"]
    result = CliRunner().invoke(main, [*args, "--expires", expires, "--home", str(home)])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.exception
    assert result.output == f"error: --expires {expires!r}: out of range (a token expires before 9000)\n"
