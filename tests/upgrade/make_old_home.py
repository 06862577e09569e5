"""Make the upgrade test's old home with an OLD version of the gateway (not run by the suite).

    git worktree add /tmp/old cab96d1
    .venv/bin/python -m tests.upgrade.make_old_home /tmp/old tests/upgrade/data/home-cab96d1.tar.gz

The old code runs from its worktree (``PYTHONPATH``), with this venv's dependencies: it initialises a home,
imports a signed policy (valid until 2036) that pins the tiny generated model, issues a token, seals a
provider key, serves a few chats through its ``openai`` route (to a fake upstream: the old code cannot load
the portable llama.cpp build's CPU variants), and verifies its ledger. The
home is packed without the model file (the test generates the identical file again) and with ``meta.json``
(the old commit and the token: a test secret).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from local_models.tiny import write_tiny_model
from tests.support.fake_upstream import FakeUpstream

SITE = "upgrade-site"


def main(old: Path, out: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PHI_")}, "PYTHONPATH": str(old)}
    work = Path(tempfile.mkdtemp())
    home = work / "home"

    def old_cli(*args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "appliance", *args], input=stdin, capture_output=True, text=True,
            env=env, cwd=work, timeout=120, check=False,
        )  # fmt: skip
        if done.returncode:
            raise SystemExit(f"old {args[:2]} failed: {done.stdout}{done.stderr}")
        return done.stdout

    commit = subprocess.run(
        ["git", "-C", str(old), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    old_cli("init", "--home", str(home), "--site", SITE)
    old_cli("policy", "keygen", "--out", str(work / "author"))
    old_cli("trust", "add", str(work / "author.pub"), "--home", str(home))
    sha = write_tiny_model(home / "models" / "demo.gguf", size="tiny")
    upstream = FakeUpstream()
    upstream.start_in_thread()
    now = datetime.now(UTC).replace(microsecond=0)
    doc = {
        "version": 3,
        "issued_at": (now - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "expires_at": "2036-01-01T00:00:00Z",
        "scope": {"sites": [SITE]},
        "routes": {
            "local": {"kind": "local", "data_classes": ["phi", "deidentified", "public"]},
            "openai": {
                "kind": "openai",
                "base_url": f"{upstream.base_url}/v1",
                "auth": "bearer",
                "data_classes": ["phi", "deidentified", "public"],
            },
        },
        "models": {"local/demo": {"file": "demo.gguf", "sha256": sha, "n_ctx": 512}},
        "organizations": {"stmarys": {"roles": {"clinician": {"models": ["local/*", "openai/*"]}}}},
        "pricing": {"openai/gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}},
    }
    (work / "policy.json").write_text(json.dumps(doc))
    old_cli("policy", "sign", str(work / "policy.json"), "--key", str(work / "author.key"), "--out",
            str(work / "policy.bundle"))  # fmt: skip
    old_cli("policy", "import", str(work / "policy.bundle"), "--home", str(home))
    token = old_cli("token", "issue", "--home", str(home), "--caller", "ward-app", "--org", "stmarys",
                    "--role", "clinician").strip().splitlines()[-1]  # fmt: skip
    old_cli("keys", "set", "openai", "--home", str(home), stdin="sk-upgrade-test-provider-key-0001")

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", "--home", str(home), "--host", "127.0.0.1",
         "--port", str(port)],
        env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        for i in range(3):
            body = {
                "model": "openai/gpt-4o-mini",
                "messages": [{"role": "user", "content": f"hi {i}"}],
                "max_tokens": 4,
            }
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
            )  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    assert answer.status == 200
            except urllib.error.HTTPError as exc:
                raise SystemExit(f"old gateway answered {exc.code}: {exc.read()!r}") from None
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        upstream.stop_thread()
    print(old_cli("audit", "verify", "--home", str(home)).strip())
    (home / "models" / "demo.gguf").unlink()
    (home / "meta.json").write_text(json.dumps({"commit": commit, "token": token, "model_sha256": sha}))
    with tarfile.open(out, "w:gz") as tar:
        tar.add(home, arcname="home")
    print(f"{out}: {out.stat().st_size} bytes, old commit {commit}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
