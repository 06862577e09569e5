"""The air-gap proof: the demo gateway, from import to shutdown, never tries to reach beyond loopback.

(i) ``phi-gateway demo`` runs in a subprocess under Python audit hooks installed before anything of the
appliance is imported (a bootstrap run with ``python -c``): every ``socket.connect``, ``socket.sendto``,
``socket.getaddrinfo`` and ``socket.gethostbyname`` to anything but loopback or a unix socket is logged to a
file. The bootstrap first imports every module of ``appliance``, ``routes``, ``local_models`` and ``tui``
(so what their dependencies do on import is seen), then runs the CLI; the test sends traffic (health, the
models list, a local-model chat, plain and streamed) and stops it with SIGTERM. The log must be empty.
It runs twice: on uvloop as shipped, and with uvloop hidden, because uvloop connects and resolves in
libuv where no Python audit hook sees it; on the asyncio loop every connect passes the audited calls.
(ii) As root, the same demo runs under ``unshare --net`` (a network namespace holding only loopback) and
must start and answer. CI runs as root, so this is skipped only for a non-root developer; a missing
``unshare`` or ``ip`` fails, naming the Debian package to install.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.airgap

_REPO = Path(__file__).resolve().parents[1]
_LISTENING = re.compile(r"phi-gateway listening on 127\.0\.0\.1:(\d+)")
_TOKEN = re.compile(r"^token: (\S+)$", re.MULTILINE)
START_TIMEOUT_S = 120.0  # the first start generates the tiny model

# Installed before the appliance is imported; logs every non-loopback destination as a JSON line.
HOOK = r"""
import ipaddress, json, os, socket, sys

_LOG = os.environ["PHI_AIRGAP_LOG"]
_EVENTS = {"socket.connect", "socket.sendto", "socket.getaddrinfo", "socket.gethostbyname"}
_LOCAL_NAMES = {None, "", "localhost", b"localhost", "localhost.localdomain"}


def _local_host(host):
    if host in _LOCAL_NAMES:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _outbound(event, args):
    if event in ("socket.connect", "socket.sendto"):
        sock, address = args
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None  # unix sockets (the admin socket), netlink: not the network
        return None if _local_host(address[0]) else address[0]
    host = args[0]
    return None if _local_host(host) else host


def _hook(event, args):
    if event not in _EVENTS:
        return
    try:
        where = _outbound(event, args)
    except Exception as exc:  # never let the hook itself break the process under test
        where = f"unreadable arguments: {exc!r}"
    if where is not None:
        with open(_LOG, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"event": event, "destination": str(where)}) + "\n")


sys.addaudithook(_hook)
if os.environ.get("PHI_AIRGAP_NO_UVLOOP"):
    sys.modules["uvloop"] = None  # the asyncio loop: its connects and lookups pass the audited calls
"""
RUN_CLI = r"""
import importlib, pkgutil

for _package in ("appliance", "routes", "local_models", "tui"):
    _root = importlib.import_module(_package)
    for _info in pkgutil.walk_packages(_root.__path__, _package + "."):
        if not _info.name.endswith("__main__"):
            importlib.import_module(_info.name)

from appliance.cli import main

sys.argv = ["phi-gateway", *sys.argv[1:]]
main()
"""
BOOTSTRAP = HOOK + RUN_CLI


def _request(
    port: int, method: str, path: str, token: str | None, body: dict[str, Any] | None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, json.dumps(body).encode() if body is not None else None, headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def drive(home: Path, logs: Path, *, uvloop: bool = True) -> dict[str, Any]:
    """Start the demo under the audit hooks, send traffic, SIGTERM it; what happened, as a dict.

    Also run as ``python -c`` inside the network namespace, where it prints that dict as JSON.
    """
    logs.mkdir(parents=True, exist_ok=True)
    hook_log = logs / "outbound.jsonl"
    hook_log.write_text("")
    stderr_path = logs / "demo.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI_")}
    env["PHI_AIRGAP_LOG"] = str(hook_log)
    if not uvloop:
        env["PHI_AIRGAP_NO_UVLOOP"] = "1"
    argv = [
        sys.executable,
        "-c",
        BOOTSTRAP,
        "demo",
        "--home",
        str(home),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]
    result: dict[str, Any] = {"answers": {}}
    with open(stderr_path, "wb") as err, open(logs / "demo.audit", "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=_REPO, env=env)
    try:
        port, token = _wait_ready(proc, stderr_path)
        answers = result["answers"]
        answers["health"] = _request(port, "GET", "/health", None, None)[0]
        answers["models"] = _request(port, "GET", "/v1/models", token, None)[0]
        chat = {"model": "local/demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        status, body = _request(port, "POST", "/v1/chat/completions", token, chat)
        answers["chat"] = status
        answers["chat_object"] = json.loads(body).get("object") if status == 200 else body.decode()[:300]
        answers["stream"] = _request(port, "POST", "/v1/chat/completions", token, {**chat, "stream": True})[0]
        proc.send_signal(signal.SIGTERM)
        result["exit"] = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    result["outbound"] = [json.loads(line) for line in hook_log.read_text().splitlines() if line.strip()]
    result["log_tail"] = stderr_path.read_text(errors="replace")[-2000:]
    return result


def _wait_ready(proc: subprocess.Popen[bytes], stderr_path: Path) -> tuple[int, str]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        log = stderr_path.read_text(errors="replace")
        port, token = _LISTENING.search(log), _TOKEN.search(log)
        if port and token:
            return int(port.group(1)), token.group(1)
        if proc.poll() is not None:
            raise AssertionError(f"the demo exited with {proc.returncode} at start:\n{log[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(
        f"the demo did not listen within {START_TIMEOUT_S} s:\n{stderr_path.read_text()[-3000:]}"
    )


def _assert_served(result: dict[str, Any]) -> None:
    answers = result["answers"]
    assert answers == {
        "health": 200,
        "models": 200,
        "chat": 200,
        "chat_object": "chat.completion",
        "stream": 200,
    }, (answers, result["log_tail"])
    assert result["exit"] == 0, result["log_tail"]


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("airgap") / "demo-home"


def test_the_hook_sees_lookups_and_connects_beyond_loopback(tmp_path: Path) -> None:
    """The control: what the proof would log if the gateway did reach out (nothing leaves: the lookup
    is of a reserved name and the connect goes to TEST-NET-1, non-blocking and closed at once)."""
    log = tmp_path / "outbound.jsonl"
    probe = (
        "import socket\n"
        "for host in ('localhost', 'phi-gateway.invalid'):\n"
        "    try:\n        socket.getaddrinfo(host, 443)\n    except OSError:\n        pass\n"
        "for address in (('127.0.0.1', 9), ('192.0.2.1', 9)):\n"
        "    with socket.socket() as s:\n        s.setblocking(False)\n"
        "        try:\n            s.connect(address)\n        except OSError:\n            pass\n"
    )
    env = {**os.environ, "PHI_AIRGAP_LOG": str(log)}
    subprocess.run([sys.executable, "-c", HOOK + probe], env=env, check=True, timeout=60)
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert logged == [
        {"event": "socket.getaddrinfo", "destination": "phi-gateway.invalid"},
        {"event": "socket.connect", "destination": "192.0.2.1"},
    ]


@pytest.mark.parametrize("uvloop", [True, False], ids=["uvloop", "asyncio"])
def test_the_demo_never_reaches_beyond_loopback(demo_home: Path, tmp_path: Path, uvloop: bool) -> None:
    result = drive(demo_home, tmp_path / "logs", uvloop=uvloop)
    assert result["outbound"] == [], result["outbound"]
    _assert_served(result)


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool) or next(
        (p for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin") if os.access(p := f"{d}/{tool}", os.X_OK)),
        None,
    )
    if path is None:
        pytest.fail(
            f"`{tool}` is missing: install the Debian package `{package}` (apt-get install -y {package})"
        )
    return path


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="a network namespace needs root (CI runs as root, where this runs)",
)
def test_the_demo_starts_and_answers_in_a_namespace_with_only_loopback(
    demo_home: Path, tmp_path: Path
) -> None:
    unshare = _require("unshare", "util-linux")
    ip = _require("ip", "iproute2")
    logs = tmp_path / "logs"
    script = (
        "import json, sys; from pathlib import Path; from tests.test_airgap import drive; "
        f"print(json.dumps(drive(Path({str(demo_home)!r}), Path({str(logs)!r}))))"
    )
    shell = (
        f"{ip} link set lo up && "
        f"test \"$({ip} -o link show | grep -vc ': lo:')\" = 0 && "  # nothing but loopback in here
        f'exec {sys.executable} -c "$0"'
    )
    done = subprocess.run(
        [unshare, "--net", "sh", "-c", shell, script],
        capture_output=True,
        text=True,
        cwd=_REPO,
        timeout=START_TIMEOUT_S + 120,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outbound"] == [], result["outbound"]
    _assert_served(result)
