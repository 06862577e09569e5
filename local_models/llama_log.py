"""Where llama.cpp's own log lines go: Python logging at DEBUG, never the gateway's stderr.

Owns: the process-wide llama.cpp/ggml log callback. llama-cpp-python's own callback maps the log levels of
an older ggml (this one numbers WARN as 3, which it takes for ERROR) and prints to stderr, so warnings
and the grammar parser's messages (which quote grammar text built from a caller's schema) reached the
operator's log. Here every line goes to the ``phi.llama_cpp`` logger at DEBUG, off unless an operator
turns it on for a diagnosis.

Must never: let llama.cpp text reach stderr or the audit lines; drop the callback object (llama.cpp keeps
only its address).
"""

from __future__ import annotations

import ctypes
import logging
import threading

import llama_cpp

log = logging.getLogger("phi.llama_cpp")
_lock = threading.Lock()
_installed = False


@llama_cpp.llama_log_callback
def _to_logging(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s", text.decode("utf-8", errors="replace").rstrip("\n"))


def quiet_llama_logs() -> None:
    """Send llama.cpp's log lines to ``phi.llama_cpp`` at DEBUG (idempotent)."""
    global _installed
    with _lock:
        if not _installed:
            llama_cpp.llama_log_set(_to_logging, ctypes.c_void_p(0))
            _installed = True
