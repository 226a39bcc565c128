"""Named network namespaces (``ip netns``): private networks for Ray on one machine.

A namespace made here has loopback up and nothing else, so whatever binds inside it is
reachable only from inside -- unless :func:`veth_pair` joins it to another such namespace
(a two-node cluster on one host): then the pair's two addresses reach each other and still
nothing else (no default route, nothing bridged to the host).

``setns(2)`` moves only the calling thread; a socket stays in the namespace it was created in.
So :meth:`NetNamespace.connector` makes sockets inside from threads that entered it, and
:meth:`NetNamespace.entered` moves the current thread in and back out.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from cluster.isolation import IsolationError
from cluster.isolation.process_group import kill_all

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/var/run/netns")
CONNECT_TIMEOUT_S = 10.0
IP_TIMEOUT_S = 15


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S,
                          check=check)


def enter_netns(path: str) -> None:
    """Move the calling thread (only it) into the network namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _setns(fd, path)
    finally:
        os.close(fd)


def _setns(fd: int, what: str) -> None:
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns({what}): {os.strerror(errno)}")


def netns_supported() -> bool:
    """Root on Linux with iproute2: the conditions under which ``ip netns`` can work."""
    return sys.platform.startswith("linux") and os.geteuid() == 0 and bool(shutil.which("ip"))


def netns_names() -> list[str]:
    """Names of the host's named network namespaces (``ip netns list``)."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()]


class NetNamespace:
    """A private network namespace with loopback up; ``delete()`` kills what runs in it.

    Names are ``<prefix>-<pid of the creator>`` (plus ``-xxxx`` on a clash), so a run can
    find its own and :meth:`sweep` can delete the ones killed runs left behind.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = str(NETNS_DIR / name)
        self._connector: ThreadPoolExecutor | None = None

    @classmethod
    def create(cls, prefix: str = "ringserve") -> NetNamespace:
        """A new namespace named after this process, loopback up; stale ones swept first."""
        existing = set(netns_names())
        existing -= cls.sweep(existing, prefix)
        name = f"{prefix}-{os.getpid()}"
        while name in existing:  # a namespace left behind by a killed run with our pid
            name = f"{prefix}-{os.getpid()}-{os.urandom(2).hex()}"
        try:
            _ip("netns", "add", name)
        except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            raise IsolationError(f"cannot create network namespace: {detail.strip()}") from None
        ns = cls(name)
        try:
            ns.ip("link", "set", "lo", "up")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            ns.delete()
            raise IsolationError(f"cannot bring up lo in {name}: {exc}") from None
        return ns

    @classmethod
    def find(cls, prefix: str, pid: int) -> NetNamespace | None:
        """The namespace process ``pid`` created with :meth:`create`, if it exists."""
        mine = f"{prefix}-{pid}"
        name = next((n for n in netns_names() if n == mine or n.startswith(mine + "-")), None)
        return cls(name) if name is not None else None

    @classmethod
    def sweep(cls, names: set[str], prefix: str) -> set[str]:
        """Delete namespaces a killed run left behind (its pid gone, nothing inside)."""
        pattern = re.compile(rf"{re.escape(prefix)}-(\d+)(?:-[0-9a-f]{{4}})?")
        swept = set()
        for name in names:
            match = pattern.fullmatch(name)
            if match and not Path(f"/proc/{match.group(1)}").exists() and not cls(name).pids():
                _ip("netns", "del", name, check=False)
                swept.add(name)
        return swept

    def exists(self) -> bool:
        return self.name in netns_names()

    def ip(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``ip -n <name> ...`` (raises CalledProcessError on failure)."""
        return _ip("-n", self.name, *args)

    def exec_prefix(self) -> list[str]:
        """Prepend to a command to run it inside: ``ip netns exec <name>``."""
        return ["ip", "netns", "exec", self.name]

    @contextmanager
    def entered(self) -> Iterator[None]:
        """Run the calling thread inside the namespace for the ``with`` block, then back."""
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            enter_netns(self.path)
            try:
                yield
            finally:
                _setns(original, "the original namespace")
        finally:
            os.close(original)

    def connector(self, port: int) -> Callable[[], socket.socket]:
        """A ``connect()`` for the forwarder: a TCP connection to 127.0.0.1:port inside."""
        if self._connector is None:
            self._connector = ThreadPoolExecutor(
                max_workers=4, thread_name_prefix=f"{self.name}-connect",
                initializer=enter_netns, initargs=(self.path,))
        pool = self._connector

        def connect() -> socket.socket:
            future = pool.submit(socket.create_connection, ("127.0.0.1", port),
                                 CONNECT_TIMEOUT_S)
            sock = future.result(timeout=CONNECT_TIMEOUT_S + 1)
            sock.settimeout(None)
            return sock

        return connect

    def pids(self) -> list[int]:
        """Processes inside (this process left out, should one of its threads be in it)."""
        out = _ip("netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]

    def delete(self) -> None:
        """Stop the connector threads, kill every process inside, delete the namespace."""
        if self._connector is not None:
            self._connector.shutdown(wait=True, cancel_futures=True)
            self._connector = None
        kill_all(self.pids)
        _ip("netns", "del", self.name, check=False)


def veth_pair(a: NetNamespace, b: NetNamespace, address_a: str, address_b: str,
              prefix_len: int = 24) -> None:
    """Join two namespaces with a veth pair, ``address_a`` on a's end, ``address_b`` on b's.

    The pair is created inside ``a`` with its peer moved straight into ``b``: no end ever
    exists on the host. It goes away with either namespace. No route beyond the pair's own
    subnet is added, so traffic from either side can only reach the other.
    """
    end_a, end_b = f"v{a.name[-13:]}", f"v{b.name[-13:]}"  # interface names: 15 chars at most
    if end_a == end_b:
        end_a, end_b = end_a[:-1] + "a", end_b[:-1] + "b"
    try:
        a.ip("link", "add", end_a, "type", "veth", "peer", "name", end_b, "netns", b.name)
        for ns, end, address in ((a, end_a, address_a), (b, end_b, address_b)):
            ns.ip("addr", "add", f"{address}/{prefix_len}", "dev", end)
            ns.ip("link", "set", end, "up")
    except subprocess.CalledProcessError as exc:
        raise IsolationError(f"cannot join {a.name} and {b.name}: {exc.stderr.strip()}") from None
