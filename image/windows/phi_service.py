"""The Phi Gateway Windows service: runs ``phi-gateway serve`` as a child process and drains it on Stop.

Owns: the service ``PhiGateway`` (pywin32's ServiceFramework, hosted by the bundled python.exe, not by
pythonservice.exe), the child's environment (PHI_HOME) and its log files, and the stop sequence.
Installed by image/windows/phi-gateway.nsi as ``<install dir>\\phi_service.py``:

    python.exe phi_service.py --startup auto install | update | start | stop | remove

Stop: the service owns a console (AllocConsole; invisible in session 0) that the child inherits in a
process group of its own, so Stop sends that group CTRL_BREAK_EVENT, which the gateway takes as SIGBREAK:
the same drain as SIGTERM/SIGINT on Linux (stop listening, finish in-flight requests, close the ledger).
If the child is still running after the drain time it is terminated.
Logs: the child's stderr (the operator log) goes to ``<home>\\logs\\gateway.log``, its stdout (one audit
JSON line per record) to ``<home>\\logs\\audit.jsonl``; the service's own start, stop and failure go to the
Windows Application event log (source PhiGateway).
Never: runs the gateway without PHI_HOME; returns from Stop while the child is still serving.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import servicemanager
import win32event
import win32service
import win32serviceutil

SERVICE_NAME = "PhiGateway"
HOME = Path(os.environ.get("PHI_HOME") or r"C:\ProgramData\Phi Gateway")
STOP_WAIT_S = 120  # above the gateway's default drain time; then the child is terminated
CLI = "import sys; sys.argv[0] = 'phi-gateway'; from appliance.cli import main; main()"


def serve_command() -> list[str]:
    """The child: the bundled interpreter running the gateway's CLI, ``serve`` on the home."""
    return [sys.executable, "-c", CLI, "serve", "--home", str(HOME)]


class PhiGatewayService(win32serviceutil.ServiceFramework):
    _svc_name_ = SERVICE_NAME
    _svc_display_name_ = "Phi Gateway"
    _svc_description_ = "Air-gapped AI gateway (HTTPS on tcp/8080); home: " + str(HOME)
    # Hosted by python.exe running this file (not pythonservice.exe, whose DLL lookups the embedded
    # runtime does not provide).
    _exe_name_ = sys.executable
    _exe_args_ = '"' + os.path.abspath(__file__) + '"'

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        self.stop_event = win32event.CreateEvent(None, True, False, None)
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()

    def SvcStop(self) -> None:  # pywin32's name
        self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=STOP_WAIT_S * 1000)
        self.stopping.set()
        win32event.SetEvent(self.stop_event)

    def SvcDoRun(self) -> None:  # pywin32's name
        logs = HOME / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        ctypes.windll.kernel32.AllocConsole()  # the console the child's process group shares with us
        env = dict(os.environ, PHI_HOME=str(HOME), PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        with open(logs / "gateway.log", "ab") as err, open(logs / "audit.jsonl", "ab") as out:
            self.child = subprocess.Popen(
                serve_command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=str(HOME),
                creationflags=subprocess.CREATE_NEW_PROCESS_GROUP,
            )
        servicemanager.LogInfoMsg(f"{SERVICE_NAME}: serving (pid {self.child.pid}), home {HOME}")
        waiter = threading.Thread(target=self._wait_child, daemon=True)
        waiter.start()
        win32event.WaitForSingleObject(self.stop_event, win32event.INFINITE)
        code = self._drain()
        if not self.stopping.is_set():
            message = (
                f"{SERVICE_NAME}: the gateway exited by itself (code {code}); see {logs / 'gateway.log'}"
            )
            servicemanager.LogErrorMsg(message)
            # pywin32 reports SERVICE_STOPPED with an error code, and the recovery actions restart it
            # (SystemExit would end the process before that report).
            raise RuntimeError(message)
        servicemanager.LogInfoMsg(f"{SERVICE_NAME}: stopped (gateway exit code {code})")

    def _wait_child(self) -> None:
        assert self.child is not None
        self.child.wait()
        win32event.SetEvent(self.stop_event)

    def _drain(self) -> int:
        child = self.child
        assert child is not None
        if child.poll() is None:
            try:
                os.kill(child.pid, signal.CTRL_BREAK_EVENT)  # the gateway drains on SIGBREAK
                return child.wait(timeout=STOP_WAIT_S)
            except (OSError, SystemError) as exc:  # no console to send the event through (wine says so)
                servicemanager.LogWarningMsg(f"{SERVICE_NAME}: cannot send CTRL_BREAK ({exc}); terminating")
            except subprocess.TimeoutExpired:
                servicemanager.LogWarningMsg(f"{SERVICE_NAME}: no exit after {STOP_WAIT_S} s; terminating")
            child.terminate()
        return child.wait()


def main() -> None:
    if len(sys.argv) == 1:  # started by the service control manager
        servicemanager.Initialize()
        servicemanager.PrepareToHostSingle(PhiGatewayService)
        servicemanager.StartServiceCtrlDispatcher()
    else:
        win32serviceutil.HandleCommandLine(PhiGatewayService)


if __name__ == "__main__":
    main()
