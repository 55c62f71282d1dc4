"""Every socket a job's processes listen on binds the host they were given (127.0.0.1 here), and
joining a group where nothing listens fails at once, in one line (vitrine/rpc_group.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT
from image_service.client import SpawnedService
from image_service.descriptor import DescriptorConfig
from tests.test_image_service import make_dataset
from vitrine import rpc_group
from vitrine.errors import UserError
from vitrine.procs import Spawned

C_MARKERS = ("frame #", "Exception raised from", ".cpp:", "c10::", "[W", "[E")  # c10 logs and C++ stack frames

# A client that joins the service's group and holds on until its stdin closes.
CLIENT = """
import sys
from image_service.client import RemoteClient
c = RemoteClient(sys.argv[1])
print(c.info()["n_images"], flush=True)
sys.stdin.read()
c.close()
"""

# Joins a group where nothing listens; prints what a user would see (the CLI prints a UserError so).
UNREACHABLE = """
import sys, time
from image_service.client import RemoteClient
from vitrine.errors import UserError
t = time.monotonic()
try:
    RemoteClient(sys.argv[1])
except UserError as exc:
    print(f"vitrine train: error: {exc}", file=sys.stderr)
    print(time.monotonic() - t)
    sys.exit(2)
"""


def _other_interface() -> str | None:
    """A network interface other than loopback with an IPv4 address (where a mistake would bind)."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and not a.address.startswith("127.") for a in addrs):
            return name
    return None


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    if not extra:  # no interface chosen by the environment: the processes choose
        for k in rpc_group.IFNAME_VARS:
            env.pop(k, None)
    return env


def _misleading_env() -> dict[str, str]:
    """TensorPipe and gloo told to use another interface: HOST must win for a process that hosts or
    joins a group on it."""
    other = _other_interface()
    return _env(**{k: other for k in rpc_group.IFNAME_VARS}) if other else _env()


def _listening(pid: int) -> list[tuple[str, int]]:
    return sorted((c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="tcp")
                  if c.status == psutil.CONN_LISTEN)


def _assert_loopback_only(pid: int, what: str) -> list[tuple[str, int]]:
    socks = _listening(pid)
    assert socks, f"{what} listens on nothing"
    assert all(ip == "127.0.0.1" for ip, _ in socks), f"{what} listens beyond 127.0.0.1: {socks}"
    return socks


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("sockets")
    ds = make_dataset(root / "ds")
    old = os.environ.copy()
    os.environ.update(_misleading_env())  # SpawnedService passes this process's environment on
    try:
        svc = SpawnedService(ds, DescriptorConfig(), root / "service", host="127.0.0.1", port=0)
    finally:
        os.environ.clear()
        os.environ.update(old)
    yield svc
    svc.stop()


def test_image_service_and_its_client_listen_on_the_given_host_only(service):
    host, port = rpc_group.parse_address(service.address)
    assert host == "127.0.0.1"
    socks = _assert_loopback_only(service.proc.pid, "the image service")
    assert ("127.0.0.1", port) in socks  # the group's rendezvous store, not *:PORT
    client = subprocess.Popen([sys.executable, "-c", CLIENT, service.address], env=_misleading_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "9", client.stderr.read()
        _assert_loopback_only(client.pid, "a client of the image service")
        _assert_loopback_only(service.proc.pid, "the image service with a client")
    finally:
        client.stdin.close()
        client.wait(60)


def _shard(tmp_path: Path, group: str, *extra: str, shard: int = 0) -> Spawned:
    ready = tmp_path / f"ps{shard}.ready.json"
    argv = [sys.executable, "-m", "trainer.ps.server", "--shard", str(shard), "--shards", "1", "--key", "sock",
            "--group", group, "--world", "1", "--ready-file", str(ready), *extra]
    old = os.environ.copy()
    os.environ.update(_misleading_env())
    try:
        return Spawned(argv, ready, tmp_path / f"ps{shard}.log", "PS shard", start_timeout_s=120)
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_a_ps_shard_listens_on_the_given_host_only(service, tmp_path):
    joined = _shard(tmp_path, service.address)  # joins the image service's group
    try:
        _assert_loopback_only(joined.proc.pid, "a PS shard in the image service's group")
    finally:
        joined.stop()
    hosting = _shard(tmp_path, "127.0.0.1:0", "--host-group", shard=1)  # a job without images
    try:
        host, port = rpc_group.parse_address(hosting.info["group"])
        assert host == "127.0.0.1" and port > 0
        socks = _assert_loopback_only(hosting.proc.pid, "a PS shard hosting the group")
        assert ("127.0.0.1", port) in socks
    finally:
        hosting.stop()


def test_listening_store_binds_the_given_host():
    import torch.distributed as dist

    store = rpc_group.listening_store("127.0.0.1", 0, world_size=2)
    mine = [s for s in _listening(os.getpid()) if s[1] == store.port]
    assert mine == [("127.0.0.1", store.port)]
    client = dist.TCPStore("127.0.0.1", store.port, is_master=False)
    assert client.add("k", 1) == 1 and store.add("k", 1) == 2
    del client, store
    deadline = time.monotonic() + 5
    while mine[0] in _listening(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mine[0] not in _listening(os.getpid())  # the socket went with the store


def test_bind_env_names_the_interface_of_the_host():
    assert rpc_group.bind_env("127.0.0.1") == {"TP_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo"}
    assert rpc_group.bind_env("0.0.0.0") == {}
    with pytest.raises(UserError, match="not an address of this machine"):
        rpc_group.bind_env("192.0.2.254")


def test_joining_where_nothing_listens_fails_at_once_in_one_line(tmp_path):
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", UNREACHABLE, "127.0.0.1:1"], env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert float(done.stdout) < 5, done.stdout  # the join itself (the 18.8 s of the issue)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("vitrine train: error: no image service answers at 127.0.0.1:1 (Connection refused)")
    assert not any(m in done.stderr for m in C_MARKERS), done.stderr
    # A PS shard told to join a group that is not there: one line too, and an exit code.
    ready = tmp_path / "ready.json"
    t = time.monotonic()
    shard = subprocess.run([sys.executable, "-m", "trainer.ps.server", "--shard", "1", "--shards", "2", "--key", "x",
                            "--group", "127.0.0.1:1", "--world", "1", "--ready-file", str(ready)],
                           env=_env(), capture_output=True, text=True, timeout=60)
    assert shard.returncode == 2 and not ready.exists()
    lines = shard.stderr.strip().splitlines()
    assert len(lines) == 1 and "no RPC group answers at 127.0.0.1:1 (Connection refused)" in lines[0], shard.stderr
    assert not any(m in shard.stderr for m in C_MARKERS), shard.stderr
    assert time.monotonic() - t < 30 and time.monotonic() - t0 < 60  # start-up included, on a busy box
