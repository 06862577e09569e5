"""Who acted, as an ``admin`` ledger record names them: the OS user of this process (the CLI) or of the
admin socket's peer (from the kernel, ``SO_PEERCRED``).

Owns: the wording ``<name> uid=<uid> pid=<pid>`` (``<account> pid=<pid>`` on Windows).
Never: takes a user name from anything a client says; fails (an account the database lacks is its uid).
"""

from __future__ import annotations

import getpass
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.http.peer import Peer

if sys.platform != "win32":
    import pwd

__all__ = ["UNKNOWN_PEER", "describe_os_user", "peer_os_user", "this_os_user"]

UNKNOWN_PEER = "unknown (the socket gave no peer credentials)"


def describe_os_user(uid: int, pid: int | None = None) -> str:
    """``<name> uid=<uid> pid=<pid>``: the OS user who acted, as an admin record names it (the name is
    left out when the account database has none for ``uid``)."""
    name = ""
    if sys.platform != "win32":
        try:
            name = pwd.getpwuid(uid).pw_name + " "
        except KeyError:  # a uid without an account (a container's, say): the uid still says who
            pass
    return f"{name}uid={uid}" + ("" if pid is None else f" pid={pid}")


def this_os_user() -> str:
    """The OS user running this process (the CLI's, in its admin records); on Windows the account name."""
    if sys.platform == "win32":
        return f"{getpass.getuser()} pid={os.getpid()}"
    return describe_os_user(os.getuid(), os.getpid())


def peer_os_user(peer: Peer) -> str:
    """The OS user at the other end of the admin socket, from ``SO_PEERCRED`` (never from the request)."""
    return UNKNOWN_PEER if peer.uid is None else describe_os_user(peer.uid, peer.pid)
