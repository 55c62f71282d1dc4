"""An emulated cluster network for a job on one machine: its processes in a Linux network namespace
whose loopback is limited by a token-bucket filter.

Every process of a Vitrine job talks over 127.0.0.1 (gloo, the RPC group, the image service, the PS
shards). Run the job's command inside `unshare -n` and each byte between them crosses the namespace's
own loopback, which `tc qdisc ... tbf rate RATE` limits: a kernel-enforced bandwidth, shared by every
flow of the job, like one link of a cluster. It emulates bandwidth only: netem (added delay) is not
in this kernel, and the loopback has no loss. Needs root (or CAP_NET_ADMIN in a user namespace); the
trainer needs nothing for it.

The burst is 256 KiB or rate/100 s, whichever is larger: the loopback's MTU is 64 KiB and a bucket
no larger than one packet drops the segments TCP sends there (`burst 64kb` stalls every connection).
Measured with one TCP flow on this machine: 96 Mbit/s at `100mbit`, 958 Mbit/s at `1gbit`.

    from network import limited
    subprocess.run(limited(argv, "100mbit"))
"""

from __future__ import annotations

import re
import shutil

UNLIMITED = "unlimited"
_RATE = re.compile(r"^(\d+)(k|m|g)bit$")
_SCALE = {"k": 1e3, "m": 1e6, "g": 1e9}
# `$0` is the rate and `$1` the burst; the command follows as "$@". Nothing from the caller is
# pasted into the shell text.
_SCRIPT = ('ip link set lo up && tc qdisc add dev lo root tbf rate "$0" burst "$1" latency 50ms && '
           'shift && exec "$@"')


def bits_per_s(rate: str) -> float:
    m = _RATE.match(rate)
    if m is None:
        raise ValueError(f"network rate {rate!r}: expected {UNLIMITED} or a number with kbit, mbit or gbit "
                         f"(e.g. 100mbit)")
    return int(m.group(1)) * _SCALE[m.group(2)]


def limited(argv: list[str], rate: str) -> list[str]:
    """`argv` run in a fresh network namespace whose loopback carries at most `rate` (e.g. "100mbit",
    "1gbit"); `unlimited`: `argv` unchanged."""
    if rate == UNLIMITED:
        return list(argv)
    burst_bytes = max(256 * 1024, int(bits_per_s(rate) / 8 / 100))
    missing = [t for t in ("unshare", "tc", "ip") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"--network {rate} needs {', '.join(missing)} (iproute2, util-linux) and root")
    return ["unshare", "-n", "sh", "-c", _SCRIPT, rate, f"{burst_bytes}b", *argv]
