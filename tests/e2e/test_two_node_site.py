"""A two-node site, the way README "Beyond one machine" sets it up: two gateways behind HAProxy on
loopback, one signed bundle and one token list imported on both (tokens travel as hashes, `token export` /
`token import`), each node its own ledger and node name; the real OpenAI SDK sends a load through the
balancer, and `audit verify` takes the two exported ledgers as one set in which every request the client
got an answer for is present exactly once."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import SITE, policy_doc
from tests.support.subprocess_gateway import GatewayProcess, cli

REPO = Path(__file__).resolve().parents[2]
REQUESTS = 40
HAPROXY_CONFIG = """\
global
    log stderr format raw local0 warning
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend api
    bind 127.0.0.1:{front}
    default_backend gateways
backend gateways
    balance roundrobin
    option httpchk GET /health
    http-check expect status 200
    default-server inter 200ms fall 2 rise 1
    server node-a 127.0.0.1:{a} check
    server node-b 127.0.0.1:{b} check
"""


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _node(root: Path, name: str, bundle: Path, author_pub: Path) -> Path:
    home = root / name
    _ok(cli(home, "init", "--site", SITE, "--node", name))
    _ok(cli(home, "trust", "add", str(author_pub)))
    _ok(cli(home, "policy", "import", str(bundle)))
    for route in ("openai", "anthropic"):
        keyed = subprocess.run(
            [sys.executable, "-m", "appliance", "keys", "set", route, "--home", str(home)],
            input=f"sk-{route}-site-key-0123456789",
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env={k: v for k, v in os.environ.items() if not k.startswith("PHI_")},
        )
        assert keyed.returncode == 0, keyed.stderr
    return home


def _wait_both_up(front: int, deadline_s: float = 20) -> None:
    """Until HAProxy's health checks have marked both nodes up (two plain /health answers in a row from
    different nodes would need a stats socket; waiting for rise=1 at 200 ms is enough, bounded)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", front), timeout=1) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    time.sleep(0.6)  # three check intervals: the second node is up too
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("HAProxy did not answer /health with 200 within the deadline")


def test_two_gateways_behind_haproxy_are_one_verifiable_site(tmp_path: Path, upstream: FakeUpstream) -> None:
    author = tmp_path / "author"
    subprocess.run(
        [sys.executable, "-m", "appliance", "policy", "keygen", "--out", str(author)],
        check=True, capture_output=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    doc = tmp_path / "policy.json"
    doc.write_text(json.dumps(policy_doc(upstream.base_url)))
    bundle = tmp_path / "policy.bundle"
    subprocess.run(
        [sys.executable, "-m", "appliance", "policy", "sign", str(doc), "--key", f"{author}.key",
         "--out", str(bundle)],
        check=True, capture_output=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    homes = [_node(tmp_path, name, bundle, Path(f"{author}.pub")) for name in ("node-a", "node-b")]

    # Tokens are issued on one node and carried to the other as hashes.
    token = _ok(cli(homes[0], "token", "issue", "--caller", "ward-app", "--org", "stmarys", "--role",
                    "radiology")).strip().splitlines()[-1]  # fmt: skip
    spare = _ok(cli(homes[0], "token", "issue", "--caller", "old-app", "--org", "stmarys", "--role",
                    "radiology")).strip().splitlines()[-1]  # fmt: skip
    export = tmp_path / "tokens.jsonl"
    _ok(cli(homes[0], "token", "export", "--out", str(export)))
    assert token.split(":")[1] not in export.read_text() and export.stat().st_mode & 0o077 == 0
    assert "ward-app: imported" in _ok(cli(homes[1], "token", "import", str(export)))
    # A revocation on the issuing node travels with the next export; importing again changes nothing else.
    _ok(cli(homes[0], "token", "revoke", "old-app"))
    _ok(cli(homes[0], "token", "export", "--out", str(export)))
    again = _ok(cli(homes[1], "token", "import", str(export)))
    assert "old-app: revoked" in again and "ward-app: unchanged" in again

    nodes = [GatewayProcess(home, tmp_path) for home in homes]
    for number, node in enumerate(nodes):
        node.logs = tmp_path / f"logs-{number}"
        node.logs.mkdir()
        node.start()
    front = _free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(front=front, a=nodes[0].port, b=nodes[1].port))
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    with (tmp_path / "haproxy.log").open("wb") as log:
        balancer = subprocess.Popen([binary, "-db", "-f", str(config)], stderr=log)
    answered: list[str] = []
    try:
        _wait_both_up(front)
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{front}/v1", api_key=token, max_retries=0, timeout=20
        ) as client:

            def one(i: int) -> str:
                messages = [{"role": "user", "content": f"request {i}"}]
                if i % 2:
                    raw = client.chat.completions.with_raw_response.create(
                        model="openai/gpt-4o-mini",
                        messages=messages,  # type: ignore[arg-type]
                    )
                    raw.parse()
                    return raw.headers["x-request-id"]
                with client.chat.completions.with_streaming_response.create(
                    model="openai/gpt-4o-mini",
                    messages=messages,
                    stream=True,  # type: ignore[arg-type]
                ) as streamed:
                    list(streamed.iter_lines())
                    return streamed.headers["x-request-id"]

            with ThreadPoolExecutor(8) as pool:
                answered = list(pool.map(one, range(REQUESTS)))
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{front}/v1", api_key=spare, max_retries=0, timeout=20
        ) as refused:
            for _ in range(2):  # the revoked token is refused by both nodes (round robin)
                try:
                    refused.chat.completions.create(
                        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
                    )
                    raise AssertionError("a revoked token was accepted")
                except openai.PermissionDeniedError:
                    pass
    finally:
        balancer.terminate()
        balancer.wait(timeout=10)
        for node in nodes:
            node.stop()
    assert len(set(answered)) == REQUESTS

    exports, keys = [], []
    for home in homes:
        keys.append(_ok(cli(home, "audit", "key")).strip())
        out = tmp_path / f"{home.name}-ledger.jsonl"
        _ok(cli(home, "audit", "export", "--out", str(out)))
        exports.append(out)
    per_node = [
        {json.loads(line).get("request_id") for line in out.read_text().splitlines()} & set(answered)
        for out in exports
    ]
    assert all(per_node), "the balancer sent every request to one node"
    verified = subprocess.run(
        [sys.executable, "-m", "appliance", "audit", "verify", *map(str, exports),
         "--key", keys[0], "--key", keys[1]],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"phi-gateway.{SITE}/node-a" in verified.stdout
    assert f"phi-gateway.{SITE}/node-b" in verified.stdout
    assert "each is in exactly one ledger" in verified.stdout
    # Every answered request is in exactly one of the two ledgers, with its outcome record.
    assert per_node[0] | per_node[1] == set(answered) and not per_node[0] & per_node[1]

    # The same ledger given twice is still one set (an export's records count once per request).
    doubled = subprocess.run(
        [sys.executable, "-m", "appliance", "audit", "verify", str(exports[0]), str(exports[0]),
         "--key", keys[0]],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert doubled.returncode == 0, doubled.stdout + doubled.stderr
