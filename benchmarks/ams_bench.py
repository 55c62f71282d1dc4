"""AMS image service: traffic per sample and per image, request dedup, and throughput with several workers.

What is measured, and how (every figure comes from real training batches of a default-size synthetic
world, batch 1024, behaviours up to 50):

1. Bytes and dedup at Zipf exponents 0.8, 1.05 and 1.2 (`--zipf`). For each, the world
   `WorldConfig(zipf=s, seed=0)` is generated and processed once (cached under
   data/bench/ams/zipf-<s>/{raw,ds}, reused while raw/world.json's settings match), then K training
   steps (`--steps`, default 30) of the real `Trainer` with the in-process image service run, and
   the worker's `TrafficMeter` is read. Reported per sample and per unique image: AMS bytes (what the
   AMS protocol moves: unique int32 ids and one embedding per unique image out, the ids again and
   one gradient row per unique image back), what a plain parameter server would move for the same
   batches (the unique images' raw pixels, or their float32 trunk features), image occurrences and
   unique images per sample, the dedup ratio (occurrences / unique) and the saving factors.
2. Remote cross-check at Zipf 1.05: the same K steps with `image_service="spawn"` (the service in
   its own process, over torch.distributed.rpc); the client's meter must equal the service's own
   counters (bytes_in + bytes_out, ids requested, unique ids computed) and the in-process run's
   meter. The same part measures the RPC framing (see the caveat below).
3. Throughput with 1, 2 and 4 concurrent clients (`--clients`): one fresh service per C
   (`workers=C`, merge window 2 ms, immediate updates); C client processes (this script's hidden
   `--client` mode; a process can hold only one RPC agent) start together (they wait for a start
   file) and each run R rounds (`--rounds`, default 20) of: embed the image ids of one real training
   batch (ad_image plus the hist_image entries within hist_len, taken from the train split as the
   trainer does; a different batch per client and round), then push random gradients of the right
   shape. Reported per C: unique images embedded per second and ids requested per second (each
   client's count over its own time inside `embed`, summed over clients), images pushed back per
   second (likewise inside `backward`), mean latency per call, wall time, and the service's side
   (unique ids it computed, merged groups).
4. Merge check: C = 2 and 4 clients request the *same* unique id set (one training batch's) at the
   same moment, R rounds of embed + backward under the sync policy (which keeps the rounds in step),
   on a service with `workers=C` and a 5 s merge window, so a group closes exactly when all C have
   asked. The service's `unique_ids_computed` is read at the end (by client 0, once every client is
   done).

Targets (issue 4, item 7); the script exits 1 when one is missed, after printing everything:
- AMS traffic per unique image per step <= 2 x out_dim x 4 bytes x 1.1 (105.6 bytes for 12-d
  float32 embeddings), at every Zipf exponent;
- the merge check computes each unique image once per round: unique_ids_computed == R x U
  (not C x R x U);
- (a consistency check; a disagreement exits 1 too) the remote run's client meter equals the
  service's own counters and the in-process run's meter.

Caveats:
- Byte counts are tensor payload (ids, embeddings, gradients), not RPC framing. Part 2 measures the
  framing of the real calls separately: the TCP bytes of the benchmark process's RPC sockets during
  the K steps (`ss -tinp`, kernel TCP counters, without TCP/IP headers). On one host TensorPipe moves
  the tensor buffers through a same-host channel (cross-memory attach or shared memory), not the
  sockets; then the socket bytes are all framing and control (Python pickle of the call,
  TensorPipe descriptors and tensor metadata). Beside it, the size of the Python pickle of one
  step's calls alone (torch's RPC pickler) is a lower bound of the framing that needs no `ss`.
- Throughput is measured on whatever machine runs this (the reference box has 2 cores shared by the
  service and all clients, so more clients mostly share the same CPU; other work on the machine
  shows in the figures).

Prints one markdown table per part, writes benchmarks/results/ams_bench.json.

    python benchmarks/ams_bench.py                       # K=30 steps, R=20 rounds
    python benchmarks/ams_bench.py --quick               # smoke run: K=4, R=4
    python benchmarks/ams_bench.py --zipf 1.05 --steps 10 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REMOTE_ZIPF = 1.05         # the world of parts 2-4
TRAFFIC_SLACK = 1.1        # target: bytes per unique image <= 2 * out_dim * 4 * TRAFFIC_SLACK
MERGE_WINDOW_MS = 2.0      # part 3: the service's default window
MERGE_CHECK_WINDOW_MS = 5000.0  # part 4: long, so a group closes when all C clients have asked
WAIT_S = 600.0             # the longest any one wait may take before the benchmark gives up


# ---------------------------------------------------------------------------------------------
# Datasets


def ensure_dataset(work: Path, zipf: float, log=print) -> Path:
    """The default world at this Zipf exponent, generated and processed once, reused after."""
    from pipeline.synth.world import WorldConfig
    from worlds import ensure_world

    return ensure_world(work / f"zipf-{zipf:g}", WorldConfig(zipf=zipf, seed=0), f"the synthetic world at zipf {zipf:g}", log)


def _batches(loader):
    """The loader's batches, epoch after epoch (as long as asked)."""
    epoch = 0
    while True:
        n = 0
        for batch in loader.epoch(epoch):
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError("the train split is empty")
        epoch += 1


def batch_image_ids(batch) -> Any:
    """The image ids the trainer sends for a batch: ad_image, then the hist_image entries within
    hist_len (as `trainer.images.image_inputs` does with both image features on)."""
    import torch

    hist = batch["hist_image"]
    mask = torch.arange(hist.shape[1]).unsqueeze(0) < batch["hist_len"].unsqueeze(1)
    return torch.cat([batch["ad_image"], hist[mask]])


def write_id_batches(ds: Path, n: int, batch_size: int, path: Path) -> None:
    """The image ids of the first `n` training batches (the trainer's loader, seed 0), as int32."""
    import torch

    from trainer.data import BatchLoader, LoaderConfig
    from trainer.dataset import open_dataset

    loader = BatchLoader(open_dataset(ds), "train", LoaderConfig(batch_size=batch_size), seed=0, shuffle=True)
    it = _batches(loader)
    torch.save([batch_image_ids(next(it)).to(torch.int32) for _ in range(n)], path)


# ---------------------------------------------------------------------------------------------
# Part 1 and 2: training steps through the trainer


def run_steps(trainer, steps: int) -> None:
    it = _batches(trainer.train_loader)
    for _ in range(steps):
        trainer.train_step(next(it))


def meter_row(zipf: float, m, out_dim: int, itemsize: int) -> dict:
    s, u = max(m.samples, 1), max(m.unique, 1)
    ams = m.bytes_sent + m.bytes_received
    return {
        "zipf": zipf, "steps": m.steps, "samples": m.samples, "occurrences": m.occurrences, "unique": m.unique,
        "ams_bytes": ams, "bytes_sent": m.bytes_sent, "bytes_received": m.bytes_received,
        "plain_pixel_bytes": m.plain_pixel_bytes, "plain_trunk_bytes": m.plain_trunk_bytes,
        "occurrences_per_sample": m.occurrences / s, "unique_per_sample": m.unique / s,
        "unique_per_step": m.unique / max(m.steps, 1), "dedup_ratio": m.occurrences / u,
        "ams_bytes_per_sample": ams / s, "pixel_bytes_per_sample": m.plain_pixel_bytes / s,
        "trunk_bytes_per_sample": m.plain_trunk_bytes / s,
        "ams_bytes_per_unique": ams / u, "pixel_bytes_per_unique": m.plain_pixel_bytes / u,
        "trunk_bytes_per_unique": m.plain_trunk_bytes / u,
        "pixels_over_ams": m.plain_pixel_bytes / max(ams, 1), "trunk_over_ams": m.plain_trunk_bytes / max(ams, 1),
        "target_bytes_per_unique": 2 * out_dim * itemsize * TRAFFIC_SLACK,
        "embed_ms": 1000 * m.embed_s / max(m.embed_calls, 1),
        "backward_ms": 1000 * m.backward_s / max(m.backward_calls, 1),
    }


def bytes_part(ds: Path, zipf: float, steps: int, batch_size: int, threads: int, tmp: Path) -> dict:
    import torch

    from trainer.train import TrainConfig, Trainer

    cfg = TrainConfig(dataset=str(ds), batch_size=batch_size, track=False, progress=False, image_service="local",
                      threads=threads, run_dir=str(tmp / f"local-{zipf:g}"))
    trainer = Trainer(cfg, Path(cfg.run_dir))
    try:
        run_steps(trainer, steps)
        client = trainer.service
        itemsize = torch.empty(0, dtype=client.descriptor.torch_dtype).element_size()
        row = meter_row(zipf, client.meter, client.out_dim, itemsize)
        row.update(out_dim=client.out_dim, trunk_dim=client.trunk_dim, pixel_bytes_per_image=client.pixel_bytes,
                   n_images=client.n_images)
        return row
    finally:
        trainer.close()


def socket_bytes(pid: int) -> tuple[int, int] | None:
    """(bytes sent, bytes received) summed over the established TCP sockets of process `pid`, from the
    kernel's counters (`ss -tinp`); None when `ss` cannot tell."""
    try:
        out = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    sent = received = found = 0
    mine = False
    for line in out.splitlines():
        if not line[:1].isspace():
            mine = f"pid={pid}," in line
            continue
        if mine:
            s, r = re.search(r"\bbytes_sent:(\d+)", line), re.search(r"\bbytes_received:(\d+)", line)
            sent += int(s.group(1)) if s else 0
            received += int(r.group(1)) if r else 0
            found += 1
    return (sent, received) if found else None


def pickle_bytes_per_step(unique: int, occurrences: int, out_dim: int, dtype) -> int | None:
    """Bytes of the Python pickles of one step's calls (embed request and answer, backward request and
    answer) as torch's RPC pickler writes them, tensors excluded: a lower bound of the framing."""
    try:
        import torch
        from torch.distributed.rpc.internal import PythonUDF, _internal_rpc_pickler

        from image_service import server

        ids = torch.zeros(unique, dtype=torch.int32)
        emb = torch.zeros(unique, out_dim, dtype=dtype)

        def size(obj) -> int:
            return len(_internal_rpc_pickler.serialize(obj)[0])

        return (size(PythonUDF(server.rpc_embed, (ids, occurrences), {})) + size((emb, 1))
                + size(PythonUDF(server.rpc_backward, (ids, emb, 1, 1), {})) + size(1))
    except Exception:  # a private API: when it moves, the column says n/a
        return None


def remote_part(ds: Path, steps: int, batch_size: int, threads: int, tmp: Path) -> dict:
    """The K steps through a spawned service; uses this process's one RPC agent."""
    from trainer.train import TrainConfig, Trainer

    cfg = TrainConfig(dataset=str(ds), batch_size=batch_size, track=False, progress=False, image_service="spawn",
                      threads=threads, run_dir=str(tmp / "remote"))
    trainer = Trainer(cfg, Path(cfg.run_dir))
    try:
        client = trainer.service
        before = socket_bytes(os.getpid())
        run_steps(trainer, steps)
        after = socket_bytes(os.getpid())
        counters = client.counters
        m = client.meter
        payload = m.bytes_sent + m.bytes_received
        out: dict[str, Any] = {
            "client_bytes": payload, "client_bytes_sent": m.bytes_sent, "client_bytes_received": m.bytes_received,
            "client_occurrences": m.occurrences, "client_unique": m.unique, "client_embed_calls": m.embed_calls,
            "client_backward_calls": m.backward_calls, "steps": m.steps, "samples": m.samples,
            "service_bytes": int(counters["bytes_in"] + counters["bytes_out"]),
            "service_bytes_in": int(counters["bytes_in"]), "service_bytes_out": int(counters["bytes_out"]),
            "service_ids_requested": int(counters["ids_requested"]),
            "service_unique_ids_computed": int(counters["unique_ids_computed"]),
            "service_embed_requests": int(counters["embed_requests"]),
            "service_backward_requests": int(counters["backward_requests"]),
            "service_updates": int(counters.get("updates", 0)),
            "embed_ms": 1000 * m.embed_s / max(m.embed_calls, 1),
            "backward_ms": 1000 * m.backward_s / max(m.backward_calls, 1),
        }
        if before is not None and after is not None:
            sock = (after[0] - before[0]) + (after[1] - before[1])
            # Tensors through the sockets (another host, or no same-host channel): framing = the rest.
            through = sock >= payload
            framing = sock - payload if through else sock
            out.update(socket_bytes=sock, tensors_through_sockets=through, framing_bytes=framing,
                       framing_per_step=framing / max(m.steps, 1), framing_per_unique=framing / max(m.unique, 1))
        else:
            out.update(socket_bytes=None, tensors_through_sockets=None, framing_bytes=None, framing_per_step=None,
                       framing_per_unique=None)
        u_step = round(m.unique / max(m.steps, 1))
        occ_step = round(m.occurrences / max(m.steps, 1))
        pk = pickle_bytes_per_step(u_step, occ_step, client.out_dim, client.descriptor.torch_dtype)
        out.update(pickle_per_step=pk, pickle_per_unique=(pk / max(u_step, 1)) if pk is not None else None)
        return out
    finally:
        trainer.close()


# ---------------------------------------------------------------------------------------------
# Part 3 and 4: concurrent client processes


def client_main(spec_path: str) -> int:
    """One client process: join the service, wait for the start file, run the rounds, write results."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from image_service.client import RemoteClient

    batches = torch.load(spec["ids_file"])
    mine = [batches[i] for i in spec["batches"]]
    gen = torch.Generator().manual_seed(spec["seed"])
    client = RemoteClient(spec["address"], name_prefix="bench")
    try:
        Path(spec["ready"]).write_text(str(os.getpid()))
        deadline = time.monotonic() + WAIT_S
        while not os.path.exists(spec["start"]):
            if time.monotonic() > deadline:
                raise SystemExit("no start signal")
            time.sleep(0.001)
        t_start = time.time()
        for r, ids in enumerate(mine):
            res = client.embed(ids)
            if spec["backward"]:
                grads = torch.randn(res.unique_ids.numel(), client.out_dim, dtype=res.embeddings.dtype,
                                    generator=gen)
                client.backward(res.unique_ids, grads, token=r)
        t_end = time.time()
        Path(spec["done"]).write_text("1")
        m = client.meter
        out = {"rounds": len(mine), "start": t_start, "end": t_end, "embed_s": m.embed_s, "backward_s": m.backward_s,
               "embed_calls": m.embed_calls, "backward_calls": m.backward_calls, "ids": m.occurrences,
               "unique": m.unique, "bytes": m.bytes_sent + m.bytes_received}
        if spec.get("counters_after"):  # read the service's counters once every client is done
            deadline = time.monotonic() + WAIT_S
            while not all(os.path.exists(p) for p in spec["counters_after"]):
                if time.monotonic() > deadline:
                    raise SystemExit("the other clients did not finish")
                time.sleep(0.005)
            out["counters"] = client.counters
        Path(spec["out"]).write_text(json.dumps(out))
    finally:
        client.close()
    return 0


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_clients(address: str, ids_file: Path, plan: list[list[int]], backward: bool, threads: int,
                tmp: Path) -> list[dict]:
    """Start one client process per entry of `plan` (its batch indices), release them together, wait
    for them; client 0 also reads the service's counters at the end."""
    tmp.mkdir(parents=True, exist_ok=True)
    start = tmp / "start"
    start.unlink(missing_ok=True)
    n = len(plan)
    specs = []
    for c, batches in enumerate(plan):
        spec = {"address": address, "ids_file": str(ids_file), "batches": batches, "backward": backward,
                "threads": threads, "seed": 1000 + c, "start": str(start), "ready": str(tmp / f"ready-{c}"),
                "done": str(tmp / f"done-{c}"), "out": str(tmp / f"out-{c}.json")}
        if c == 0:
            spec["counters_after"] = [str(tmp / f"done-{k}") for k in range(n)]
        for key in ("ready", "done", "out"):
            Path(spec[key]).unlink(missing_ok=True)
        (tmp / f"spec-{c}.json").write_text(json.dumps(spec))
        specs.append(spec)
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for c in range(n):
            log = open(tmp / f"client-{c}.log", "wb")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--client",
                                           str(tmp / f"spec-{c}.json")], stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + WAIT_S

        def check_alive():
            for c, p in enumerate(procs):
                if p.poll() is not None and p.returncode != 0:
                    raise RuntimeError(f"client {c} exited with {p.returncode}:\n{_tail(tmp / f'client-{c}.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"clients did not finish within {WAIT_S:.0f} s")

        while not all(Path(s["ready"]).exists() for s in specs):
            check_alive()
            time.sleep(0.01)
        start.write_text("go")
        while any(p.poll() is None for p in procs):
            check_alive()
            time.sleep(0.02)
        check_alive()
        return [json.loads(Path(s["out"]).read_text()) for s in specs]
    finally:
        for p in procs:
            _stop(p)
        for log in logs:
            log.close()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def spawn_service(ds: Path, state_dir: Path, **options):
    from image_service.client import SpawnedService
    from image_service.descriptor import DescriptorConfig

    return SpawnedService(ds, DescriptorConfig(), state_dir, start_timeout_s=WAIT_S, **options)


def throughput_part(ds: Path, ids_file: Path, clients: int, rounds: int, threads: int, service_threads: int,
                    tmp: Path) -> dict:
    svc = None
    try:
        svc = spawn_service(ds, tmp / f"service-c{clients}", workers=clients, merge_window_ms=MERGE_WINDOW_MS,
                            threads=service_threads)
        plan = [[c * rounds + r for r in range(rounds)] for c in range(clients)]
        res = run_clients(svc.address, ids_file, plan, backward=True, threads=threads, tmp=tmp / f"clients-c{clients}")
    finally:
        if svc is not None:
            svc.stop()
    c = res[0]["counters"]
    ids, unique = sum(r["ids"] for r in res), sum(r["unique"] for r in res)
    wall = max(r["end"] for r in res) - min(r["start"] for r in res)
    return {
        "clients": clients, "rounds": rounds, "ids_requested": ids, "unique_requested": unique,
        "embed_unique_per_s": sum(r["unique"] / max(r["embed_s"], 1e-9) for r in res),
        "embed_ids_per_s": sum(r["ids"] / max(r["embed_s"], 1e-9) for r in res),
        "backward_images_per_s": sum(r["unique"] / max(r["backward_s"], 1e-9) for r in res),
        "embed_ms": 1000 * sum(r["embed_s"] for r in res) / max(sum(r["embed_calls"] for r in res), 1),
        "backward_ms": 1000 * sum(r["backward_s"] for r in res) / max(sum(r["backward_calls"] for r in res), 1),
        "wall_s": wall, "rounds_per_s": sum(r["rounds"] for r in res) / max(wall, 1e-9),
        "service_unique_computed": int(c["unique_ids_computed"]),
        "service_merged_computes": int(c["merged_computes"]),
        "service_largest_group": int(c["merger_largest_group"]), "service_updates": int(c.get("updates", 0)),
        "per_client": res,
    }


def merge_part(ds: Path, ids_file: Path, clients: int, rounds: int, threads: int, service_threads: int,
               tmp: Path) -> dict:
    import torch

    u = int(torch.unique(torch.load(ids_file)[0]).numel())
    svc = None
    try:
        svc = spawn_service(ds, tmp / f"merge-service-c{clients}", workers=clients, policy="sync",
                            merge_window_ms=MERGE_CHECK_WINDOW_MS, threads=service_threads)
        plan = [[0] * rounds for _ in range(clients)]  # everyone asks for the same batch, every round
        res = run_clients(svc.address, ids_file, plan, backward=True, threads=threads, tmp=tmp / f"merge-c{clients}")
    finally:
        if svc is not None:
            svc.stop()
    c = res[0]["counters"]
    computed = int(c["unique_ids_computed"])
    return {
        "clients": clients, "rounds": rounds, "unique_per_request": u, "unique_ids_computed": computed,
        "expected": rounds * u, "without_merging": clients * rounds * u,
        "merged_computes": int(c["merged_computes"]), "largest_group": int(c["merger_largest_group"]),
        "updates": int(c.get("updates", 0)), "ids_requested": int(c["ids_requested"]),
        "wall_s": max(r["end"] for r in res) - min(r["start"] for r in res),
        "ok": computed == rounds * u,
    }


# ---------------------------------------------------------------------------------------------
# Report


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(c if isinstance(c, str) else _fmt(c) for c in r) + " |")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="training steps per Zipf exponent (parts 1 and 2)")
    ap.add_argument("--rounds", type=int, default=20, help="rounds per client (parts 3 and 4)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 steps, 4 rounds")
    ap.add_argument("--zipf", type=float, nargs="+", default=[0.8, 1.05, 1.2], help="Zipf exponents of part 1")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4], help="concurrent clients of part 3")
    ap.add_argument("--merge-clients", type=int, nargs="+", default=[2, 4], help="concurrent clients of part 4")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process and of each client (0 = all cores)")
    ap.add_argument("--service-threads", type=int, default=0, help="torch threads of each service (0 = all cores)")
    ap.add_argument("--work", default=str(ROOT / "data" / "bench" / "ams"), help="where worlds and datasets are cached")
    ap.add_argument("--client", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        return client_main(args.client)
    if args.quick:
        args.steps, args.rounds = 4, 4
    if args.steps < 1 or args.rounds < 1:
        ap.error("--steps and --rounds must be >= 1")

    t_all = time.perf_counter()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    failures: list[str] = []
    try:
        datasets = {z: ensure_dataset(work, z) for z in dict.fromkeys([*args.zipf, REMOTE_ZIPF])}

        # -- 1. bytes and dedup
        rows = []
        for z in args.zipf:
            print(f"part 1: {args.steps} steps at zipf {z:g} (in-process service)", flush=True)
            rows.append(bytes_part(datasets[z], z, args.steps, args.batch_size, args.threads, tmp))
        target = rows[0]["target_bytes_per_unique"] if rows else 2 * 12 * 4 * TRAFFIC_SLACK
        for r in rows:
            if r["ams_bytes_per_unique"] > r["target_bytes_per_unique"]:
                failures.append(f"zipf {r['zipf']:g}: {r['ams_bytes_per_unique']:.1f} AMS bytes per unique image "
                                f"per step (target <= {r['target_bytes_per_unique']:.1f})")

        # -- 2. remote cross-check
        print(f"part 2: {args.steps} steps at zipf {REMOTE_ZIPF:g} through a spawned service", flush=True)
        remote = remote_part(datasets[REMOTE_ZIPF], args.steps, args.batch_size, args.threads, tmp)
        local = next((r for r in rows if r["zipf"] == REMOTE_ZIPF), None)
        remote["local_bytes"] = local["ams_bytes"] if local else None
        agree = (remote["client_bytes"] == remote["service_bytes"]
                 and remote["client_occurrences"] == remote["service_ids_requested"]
                 and remote["client_unique"] == remote["service_unique_ids_computed"])
        remote["agree"] = agree
        if not agree:
            failures.append(f"remote run: the client counted {remote['client_bytes']} bytes, "
                            f"{remote['client_occurrences']} ids and {remote['client_unique']} unique; the service "
                            f"{remote['service_bytes']}, {remote['service_ids_requested']} and "
                            f"{remote['service_unique_ids_computed']}")
        if local is not None and local["ams_bytes"] != remote["client_bytes"]:
            failures.append(f"remote run moved {remote['client_bytes']} bytes, the same steps in process "
                            f"{local['ams_bytes']}")

        # -- 3. throughput, 4. merge check (the ids of real training batches, shared through a file)
        need = max([c * args.rounds for c in args.clients] + [1])
        ids_file = tmp / "batches.pt"
        write_id_batches(datasets[REMOTE_ZIPF], need, args.batch_size, ids_file)
        tput = []
        for c in args.clients:
            print(f"part 3: {c} client(s) x {args.rounds} rounds", flush=True)
            tput.append(throughput_part(datasets[REMOTE_ZIPF], ids_file, c, args.rounds, args.threads,
                                        args.service_threads, tmp))
        merges = []
        for c in args.merge_clients:
            print(f"part 4: merge check, {c} clients x {args.rounds} rounds", flush=True)
            merges.append(merge_part(datasets[REMOTE_ZIPF], ids_file, c, args.rounds, args.threads,
                                     args.service_threads, tmp))
        for m in merges:
            if not m["ok"]:
                failures.append(f"merge check with {m['clients']} clients: {m['unique_ids_computed']} unique ids "
                                f"computed, expected {m['expected']} (rounds x U; without merging "
                                f"{m['without_merging']})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - t_all

    # -- report
    print()
    print(f"## 1. AMS traffic and dedup, {args.steps} training steps of batch {args.batch_size} per Zipf exponent "
          f"(in-process service; payload bytes)")
    _table(["zipf", "occurrences/sample", "unique/sample", "unique/step", "dedup", "AMS B/sample", "pixel B/sample",
            "trunk B/sample", "AMS B/unique img", "pixel B/unique img", "trunk B/unique img", "pixels/AMS",
            "trunk/AMS"],
           [[f"{r['zipf']:g}", f"{r['occurrences_per_sample']:.2f}", f"{r['unique_per_sample']:.3f}",
             f"{r['unique_per_step']:.0f}", f"{r['dedup_ratio']:.1f}", r["ams_bytes_per_sample"],
             r["pixel_bytes_per_sample"], r["trunk_bytes_per_sample"], r["ams_bytes_per_unique"],
             r["pixel_bytes_per_unique"], r["trunk_bytes_per_unique"], f"{r['pixels_over_ams']:.0f}x",
             f"{r['trunk_over_ams']:.0f}x"] for r in rows])
    if rows:
        print(f"out_dim {rows[0]['out_dim']}, trunk_dim {rows[0]['trunk_dim']}, "
              f"{rows[0]['pixel_bytes_per_image']} pixel bytes per image; target <= {target:.1f} AMS bytes per "
              f"unique image per step")
        print()

    print(f"## 2. Remote cross-check at zipf {REMOTE_ZIPF:g}: the same {args.steps} steps through a spawned service")
    r = remote
    _table(["", "payload bytes", "ids (with repeats)", "unique ids", "embed calls", "backward calls"],
           [["client meter (remote)", r["client_bytes"], r["client_occurrences"], r["client_unique"],
             r["client_embed_calls"], r["client_backward_calls"]],
            ["service counters", r["service_bytes"], r["service_ids_requested"], r["service_unique_ids_computed"],
             r["service_embed_requests"], r["service_backward_requests"]],
            ["client meter (in process)", r["local_bytes"], local["occurrences"] if local else None,
             local["unique"] if local else None, None, None]])
    where = ("tensors went through the sockets: framing = socket bytes - payload"
             if r["tensors_through_sockets"] else
             "tensors went through TensorPipe's same-host channel: all socket bytes are framing"
             if r["tensors_through_sockets"] is not None else "ss unavailable")
    _table(["RPC framing (not in the payload)", "bytes per step", "bytes per unique image"],
           [[f"TCP bytes of the RPC sockets ({where})", r["framing_per_step"], r["framing_per_unique"]],
            ["Python pickle of the calls alone (lower bound)", r["pickle_per_step"], r["pickle_per_unique"]]])
    print(f"client and service agree: {_fmt(agree)}; payload per unique image "
          f"{r['client_bytes'] / max(r['client_unique'], 1):.1f} B; embed {r['embed_ms']:.1f} ms, backward "
          f"{r['backward_ms']:.1f} ms per call")
    print()

    print(f"## 3. Throughput: C concurrent client processes x {args.rounds} rounds (embed one training batch's "
          f"images + backward), one service (workers=C, merge window {MERGE_WINDOW_MS:g} ms, immediate updates), "
          f"{os.cpu_count()} cores shared")
    _table(["clients", "ids requested", "unique requested", "embed unique img/s", "embed ids/s", "backward img/s",
            "embed ms/call", "backward ms/call", "wall s", "rounds/s", "service computed", "merged groups (largest)"],
           [[t["clients"], t["ids_requested"], t["unique_requested"], f"{t['embed_unique_per_s']:,.0f}",
             f"{t['embed_ids_per_s']:,.0f}", f"{t['backward_images_per_s']:,.0f}", t["embed_ms"], t["backward_ms"],
             f"{t['wall_s']:.2f}", f"{t['rounds_per_s']:.1f}", t["service_unique_computed"],
             f"{t['service_merged_computes']} ({t['service_largest_group']})"] for t in tput])
    print("img/s and ids/s: each client's count over its own time inside the call, summed over clients")
    print()

    print(f"## 4. Merge check: C clients request the same unique ids at the same moment, {args.rounds} rounds "
          f"(embed + backward, sync policy; workers=C, merge window {MERGE_CHECK_WINDOW_MS:g} ms)")
    _table(["clients", "rounds", "U", "unique_ids_computed", "expected R x U", "without merging C x R x U",
            "merged computes", "largest group", "updates", "ok"],
           [[m["clients"], m["rounds"], m["unique_per_request"], m["unique_ids_computed"], m["expected"],
             m["without_merging"], m["merged_computes"], m["largest_group"], m["updates"], m["ok"]] for m in merges])

    print(f"run time {elapsed:.0f} s")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "ams_bench.json").write_text(json.dumps({
        "settings": {"steps": args.steps, "rounds": args.rounds, "batch_size": args.batch_size, "zipf": args.zipf,
                     "clients": args.clients, "merge_clients": args.merge_clients, "threads": args.threads,
                     "service_threads": args.service_threads, "cpus": os.cpu_count()},
        "bytes": rows, "remote": remote, "throughput": tput, "merge": merges,
        "targets": {"bytes_per_unique_image": target, "merge": "unique_ids_computed == rounds x U"},
        "failures": failures, "elapsed_s": round(elapsed, 1)}, indent=2, default=str))
    if failures:
        for f in failures:
            print("MISSED:", f)
        return 1
    print("all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
