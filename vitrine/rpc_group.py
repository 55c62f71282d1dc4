"""Membership of a torch.distributed.rpc group, and sockets that listen only where they are told.

A job's processes (the image service, the PS shards, the workers) meet in one *dynamic* RPC group
(`world_size=None`: members join and leave at any time). Its rank 0 hosts the group's rendezvous
store on HOST:PORT (`host_group`); the others `join` it by that address, take the next rank from a
counter in the store, and are named PREFIX + rank. A process is a member of at most one group;
`join`s of the same group are counted and the process leaves it at the last `leave`. Caveats:
TensorPipe reads TP_SOCKET_IFNAME once per process, and an interface with several IPv4 addresses
is bound at its first one.

Where each socket listens (every listening socket binds to the host it was given, 127.0.0.1 by default):

- the rendezvous store (torch's TCPStore): its server would bind every interface whatever host it is
  given, so `listening_store` binds and listens on (HOST, PORT) itself and hands the socket to the
  store (`master_listen_fd`, libuv backend, which then owns and closes it); port 0 takes a port the
  system picks, with no window for another process to take it first. `rpc.init_rpc` is pointed at that
  store through a rendezvous handler of our own (`vitrine://`).
- the RPC agent (TensorPipe's uv transport, and its multiplexed uv channel): binds the address of the
  network interface named by `TP_SOCKET_IFNAME`, else whatever this machine's hostname resolves to.
- gloo (the all-reduce workers' process group; RPC's static groups): `GLOO_SOCKET_IFNAME`, else the
  hostname's address.

Both variables name an interface, not an address: `bind_env(host)` gives the ones for HOST (the
interface that holds that address), for a launcher to put into its children's environment.
`host_group` sets both in this process from its HOST, before the agent starts (TensorPipe reads its
variable once per process); `join` sets TP_SOCKET_IFNAME from the local address this machine uses to
reach the group (whatever the environment said: the group must reach us there), and
GLOO_SOCKET_IFNAME likewise unless the environment names an interface already.

Joining a group where nothing listens fails at once (a plain connect first, so no retry loop of the
store's, whose C++ log lines carry stack frames) with `GroupUnreachable`, one line.

torch is imported inside the functions: `vitrine` stays cheap to import.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from vitrine.errors import UserError

DEFAULT_HOST = "127.0.0.1"
RANK_KEY = "vitrine/next_rank"  # the store's counter of ranks: a joining process takes the next one
SCHEME = "vitrine"  # init_method scheme whose rendezvous hands rpc.init_rpc a store built here
IFNAME_VARS = ("TP_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")

log = logging.getLogger(__name__)


class GroupUnreachable(UserError, ConnectionError):
    """Nothing answers at a group's address (not started, gone, or unreachable)."""

    def __init__(self, host: str, port: int, reason: str):
        self.host, self.port, self.reason = host, port, reason
        super().__init__(f"no RPC group answers at {format_address(host, port)} ({reason})")


@dataclass
class Membership:
    """This process's place in an RPC group."""

    host: str  # the group's rendezvous address
    port: int
    name: str
    rank: int
    hosting: bool  # rank 0: this process holds the group's store
    store: Any = None  # the TCPStore (the listening one when hosting)
    users: int = 1

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)


_MEMBER: Membership | None = None
_LOCK = threading.Lock()


# -- addresses and interfaces ----------------------------------------------------------------------
def parse_address(address: str, what: str = "image service", any_port: bool = False) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) -> (host, port); port 0 (pick one) only with `any_port`."""
    host, sep, port = str(address).rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not (0 if any_port else 1) <= int(port) < 65536:
        raise UserError(f"{what} address {address!r} is not HOST:PORT (e.g. 127.0.0.1:29400)")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def first_line(exc: BaseException) -> str:
    """An exception's message without what C++ may append (stack frames, `Exception raised from`)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _resolve(host: str) -> str:
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    infos.sort(key=lambda i: i[0] != socket.AF_INET)  # IPv4 first, as the store and TensorPipe do
    return infos[0][4][0]


def interface_for(host: str) -> str | None:
    """The network interface holding HOST's address (e.g. "lo" for 127.0.0.1); None for a wildcard
    host (0.0.0.0, ::), which names no interface. A host that is not this machine's is refused."""
    import psutil

    try:
        ip = _resolve(host)
    except OSError as exc:
        raise UserError(f"cannot listen on {host!r}: {exc.strerror or exc}") from None
    if ip in ("0.0.0.0", "::"):
        return None
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6) and a.address.split("%")[0] == ip:
                return name
    raise UserError(f"cannot listen on {host!r}: {ip} is not an address of this machine")


def bind_env(host: str = DEFAULT_HOST) -> dict[str, str]:
    """The environment a process needs for its RPC agent (TensorPipe) and gloo process groups to
    listen on HOST's interface only: {TP_SOCKET_IFNAME, GLOO_SOCKET_IFNAME}; {} for a wildcard host.
    A launcher merges it into its children's environment."""
    name = interface_for(host)
    return {} if name is None else {var: name for var in IFNAME_VARS}


def _apply_env(env: dict[str, str], keep: tuple[str, ...] = ()) -> None:
    """Set ENV in this process (and so in its children); a variable in KEEP that is set stays."""
    for k, v in env.items():
        if k not in keep or not os.environ.get(k):
            os.environ[k] = v


# -- listening sockets -----------------------------------------------------------------------------
def listening_socket(host: str, port: int = 0, what: str = "this process") -> socket.socket:
    """A TCP socket bound to (HOST, PORT) and listening; port 0 = one the system picks."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    except OSError as exc:
        raise UserError(f"{what} cannot listen on {format_address(host, port)}: {exc.strerror or exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a fixed port right after a restart
        sock.bind(addr)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise UserError(f"{what} could not listen on {format_address(host, port)}: {exc.strerror or exc}") from None
    return sock


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port free at this moment on HOST. Racy (another process may take it before it is bound):
    only for a number another program must be told up front (torchrun's --master-port); a store of
    ours binds port 0 instead (`listening_store`)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listening_store(host: str = DEFAULT_HOST, port: int = 0, world_size: int | None = None,
                    timeout_s: float = 300.0, what: str = "the rendezvous store"):
    """A master `TCPStore` listening on HOST:PORT only (port 0 = pick one; read `.port`). Others
    connect to it as clients (`TCPStore(host, port, is_master=False)`, or env:// with MASTER_ADDR,
    MASTER_PORT and TORCHELASTIC_USE_AGENT_STORE=True). The socket closes with the store."""
    import torch.distributed as dist

    sock = listening_socket(host, port, what)
    bound = sock.getsockname()[1]
    fd = sock.detach()  # the store's libuv server owns the descriptor from here (and closes it)
    try:
        # libuv: the other backend works too, but aborts the process if the socket goes first.
        return dist.TCPStore(host, bound, world_size=world_size, is_master=True, wait_for_workers=False,
                             timeout=timedelta(seconds=timeout_s), master_listen_fd=fd, use_libuv=True)
    except Exception as exc:
        try:
            os.close(fd)
        except OSError:
            pass
        raise UserError(f"{what} could not start on {format_address(host, bound)}: {first_line(exc)}") from None


# -- the RPC agent ---------------------------------------------------------------------------------
_STORES: dict[str, Any] = {}  # init_method token -> the store rpc.init_rpc is to use
_TOKENS = itertools.count()
_REGISTERED = False


def _rendezvous(url: str, **_kwargs):
    """`vitrine://HOST:PORT/TOKEN?rank=R&world_size=W` -> the store registered under TOKEN."""
    from urllib.parse import parse_qsl, urlparse

    parsed = urlparse(url)
    query = dict(parse_qsl(parsed.query))
    store = _STORES.get(parsed.path.strip("/"))
    if store is None:
        raise RuntimeError(f"{SCHEME}:// rendezvous: no store for {url} (use vitrine.rpc_group)")
    yield store, int(query.get("rank", -1)), int(query.get("world_size", -1))
    raise RuntimeError(f"{SCHEME}:// rendezvous cannot be repeated")


def _register_rendezvous() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from torch.distributed.rendezvous import register_rendezvous_handler

    try:
        register_rendezvous_handler(SCHEME, _rendezvous)
    except RuntimeError:  # registered already (this module imported twice, e.g. as __main__)
        pass
    _REGISTERED = True


def _start_agent(name: str, rank: int, store: Any, host: str, port: int, options: dict[str, Any]) -> None:
    import torch.distributed.rpc as rpc

    _register_rendezvous()
    token = f"{os.getpid()}.{next(_TOKENS)}"
    _STORES[token] = store
    opts = {"_transports": ["uv"], **options}
    try:
        rpc.init_rpc(name, rank=rank, world_size=None, rpc_backend_options=rpc.TensorPipeRpcBackendOptions(
            init_method=f"{SCHEME}://{format_address(host, port)}/{token}", **opts))
    finally:
        _STORES.pop(token, None)


# -- membership ------------------------------------------------------------------------------------
def membership() -> Membership | None:
    """This process's group, or None."""
    return _MEMBER


def host_group(name: str, host: str = DEFAULT_HOST, port: int = 0, what: str = "the RPC group",
         **options: Any) -> Membership:
    """Start an RPC group as its rank 0 (named NAME), its store listening on HOST:PORT (0 = pick one:
    `membership().port`). `options`: `TensorPipeRpcBackendOptions` fields (rpc_timeout, ...)."""
    global _MEMBER
    with _LOCK:
        if _MEMBER is not None:
            raise UserError(f"{what}: this process is already in the RPC group at {_MEMBER.address}")
        _apply_env(bind_env(host))
        store = listening_store(host, port, None, float(options.get("rpc_timeout", 300.0)), what)
        try:
            _start_agent(name, 0, store, host, store.port, options)
        except Exception as exc:
            log.debug("RPC agent of %s failed to start", name, exc_info=True)
            raise UserError(f"{what} could not start its RPC agent on {format_address(host, store.port)}: "
                            f"{first_line(exc)}") from None
        _MEMBER = Membership(host, int(store.port), name, 0, hosting=True, store=store)
        return _MEMBER


def _local_address(host: str, port: int, timeout_s: float) -> str:
    """Connect once to HOST:PORT: raises `GroupUnreachable` at once where nothing listens; else
    returns this machine's address on the route to it (where our own agent is to listen)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            return s.getsockname()[0]
    except OSError as exc:
        raise GroupUnreachable(host, port, exc.strerror or str(exc) or "timed out") from None


def join(address: str | tuple[str, int], prefix: str = "", timeout_s: float = 120.0,
         connect_timeout_s: float = 3.0, name: str | None = None, **options: Any) -> tuple[str, int]:
    """Join the RPC group whose store listens at ADDRESS (HOST:PORT) as PREFIX<rank> (or as NAME,
    unique in the group); returns (name, rank). Joining the group this process is in already counts
    one more user of it.
    Raises `GroupUnreachable` within `connect_timeout_s` where no group answers. `options`:
    `TensorPipeRpcBackendOptions` fields; `timeout_s` is the RPC timeout."""
    global _MEMBER
    import torch.distributed as dist

    h, p = parse_address(address, "RPC group") if isinstance(address, str) else (address[0], int(address[1]))
    with _LOCK:
        if _MEMBER is not None:
            if (_MEMBER.host, _MEMBER.port) != (h, p):
                raise UserError(f"this process is in the RPC group at {_MEMBER.address} already; it cannot "
                                f"also join {format_address(h, p)}")
            _MEMBER.users += 1
            return _MEMBER.name, _MEMBER.rank
        local = _local_address(h, p, connect_timeout_s)
        try:
            # Our agent listens where the group reaches us; a process group made later keeps a choice
            # of interface the environment made (the all-reduce workers' gloo group predates this).
            _apply_env(bind_env(local), keep=("GLOO_SOCKET_IFNAME",))
        except UserError:  # an address no interface holds (NAT, a proxy): leave the defaults
            pass
        try:
            store = dist.TCPStore(h, p, is_master=False, timeout=timedelta(seconds=connect_timeout_s))
            rank = int(store.add(RANK_KEY, 1))
        except Exception as exc:
            log.debug("rendezvous store at %s:%s", h, p, exc_info=True)
            raise GroupUnreachable(h, p, first_line(exc)) from None
        store.set_timeout(timedelta(seconds=timeout_s))
        name = name or f"{prefix}{rank}"
        try:
            _start_agent(name, rank, store, h, p, {"rpc_timeout": timeout_s, **options})
        except Exception as exc:
            log.debug("RPC agent of %s failed to start", name, exc_info=True)
            raise UserError(f"could not join the RPC group at {format_address(h, p)} as {name}: "
                            f"{first_line(exc)}") from None
        _MEMBER = Membership(h, p, name, rank, hosting=False, store=store)
        return name, rank


def leave(graceful: bool = True) -> None:
    """One user of this process's membership is done; the last one leaves the group. Graceful: wait
    for every member's outstanding work (a member that is gone makes it wait for ever: pass False)."""
    global _MEMBER
    import torch.distributed.rpc as rpc

    with _LOCK:
        m = _MEMBER
        if m is None:
            return
        m.users -= 1
        if m.users > 0:
            return
        _MEMBER = None
        try:
            rpc.shutdown(graceful=graceful)
        except Exception:
            if graceful:  # a member went away first: leave without the group's handshake
                try:
                    rpc.shutdown(graceful=False)
                except Exception:
                    pass
        m.store = None  # the host's listening socket closes with its store
