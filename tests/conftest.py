"""Shared fixtures: an isolated data root and MLflow store per session, small raw sources made by
hand (so each test controls exactly what is in them), and one LocalCluster for the pipeline tests
that do not test cluster start-up itself."""

from __future__ import annotations

import ast
import functools
import inspect
import os
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def isolated_data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vitrine-data")
    old = {k: os.environ.get(k) for k in ("VITRINE_DATA", "MLFLOW_TRACKING_URI")}
    os.environ["VITRINE_DATA"] = str(root)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def dask_address():
    """One LocalCluster on loopback shared by the pipeline tests (start-up costs seconds)."""
    import logging

    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None, silence_logs=logging.ERROR)
    yield cluster.scheduler_address
    cluster.close()


def make_raw(
    out: Path,
    n: int = 3000,
    users: int = 40,
    items: int = 25,
    days: int = 6,
    seed: int = 0,
    fmt: str = "parquet",
    tie_share: float = 0.1,
) -> pd.DataFrame:
    """A small raw source in the generator's layout; returns the impressions written.

    A share of rows copies the previous row's user and timestamp, so equal timestamps (ties) are
    common, which is where look-ahead bugs hide.
    """
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    secs = rng.integers(0, days * 86400, n)
    user = rng.integers(0, users, n)
    tie = rng.random(n) < tie_share
    for i in np.flatnonzero(tie):
        if i:
            secs[i] = secs[i - 1]
            user[i] = user[i - 1]
    df = pd.DataFrame({
        "impression_id": rng.permutation(n).astype(np.int64) + 1000,
        "timestamp": pd.Timestamp("2026-01-01") + pd.to_timedelta(secs, unit="s"),
        "user_id": user.astype(np.int64),
        "item_id": rng.zipf(1.5, n).clip(1, items).astype(np.int64) - 1,
        "click": (rng.random(n) < 0.3).astype(np.int8),
    })
    if fmt == "parquet":
        (out / "impressions").mkdir(exist_ok=True)
        half = n // 2
        df.iloc[:half].to_parquet(out / "impressions" / "part-00000.parquet", index=False)
        df.iloc[half:].to_parquet(out / "impressions" / "part-00001.parquet", index=False)
    else:
        df.assign(timestamp=df.timestamp.dt.strftime("%Y-%m-%dT%H:%M:%S")).to_csv(out / "impressions.csv", index=False)
    pd.DataFrame({
        "item_id": np.arange(items, dtype=np.int64),
        "category_id": np.arange(items, dtype=np.int64) % 5,
        "shop_id": np.arange(items, dtype=np.int64) % 3,
        "image": [f"{i:03d}.png" for i in range(items)],
    }).to_parquet(out / "items.parquet", index=False)
    pd.DataFrame({
        "user_id": np.arange(users, dtype=np.int64),
        "gender": (np.arange(users) % 2).astype(np.int8),
        "age_bucket": (np.arange(users) % 4).astype(np.int8),
    }).to_parquet(out / "users.parquet", index=False)
    for i in range(items):
        Image.new("RGB", (24, 24), (i * 9 % 256, 100, 200)).save(out / "images" / f"{i:03d}.png")
    imp_path = "impressions" if fmt == "parquet" else "impressions.csv"
    (out / "source.toml").write_text(f"""
[impressions]
path = "{imp_path}"
[items]
path = "items.parquet"
[users]
path = "users.parquet"
profile = ["gender", "age_bucket"]
[images]
dir = "images"
""")
    return df


@pytest.fixture
def raw_source(tmp_path):
    df = make_raw(tmp_path / "raw")
    return tmp_path / "raw", df


@pytest.fixture(scope="session")
def world_dataset(tmp_path_factory, dask_address):
    from pipeline.build import PipelineConfig, run_pipeline
    from pipeline.synth.world import WorldConfig, generate

    root = tmp_path_factory.mktemp("train-world")
    generate(WorldConfig(users=300, items=150, days=5, seed=5), root / "raw", progress=False)
    run_pipeline(PipelineConfig(raw=str(root / "raw"), out=str(root / "ds"), scheduler=dask_address,
                                progress=False, max_behaviors=20, track=False))
    return root / "ds"


# -- test tiers --------------------------------------------------------------------------------------
# Every test gets exactly one of three markers, so a tier runs alone (`pytest -m unit`):
#   unit          fast and in-process
#   multiprocess  starts processes: subprocesses, a Dask cluster, torch.distributed / torchrun
#                 workers, servers (and every test marked `slow`)
#   browser       the dashboard in headless Chromium (Playwright)
# A tier marker written on a test (or its class or module) wins; otherwise the tier is derived here,
# so a new test needs no marker: browser for the modules below; multiprocess when the test is marked
# slow, uses a fixture that starts processes (directly or through another fixture), or its own code,
# a helper function of its module it calls, or one of the tests/ fixtures it uses, calls one of the
# process-starting APIs in _SPAWNS; unit otherwise. A test that starts processes only inside the code
# under test is invisible to that reading: list it in _TIER_OF, and check with
# `VITRINE_CHECK_TIERS=1 pytest -m unit`, which names every unit test that started a process.
TIERS = ("unit", "multiprocess", "browser")
_BROWSER_MODULES = {"test_dashboard_e2e.py"}
_PROCESS_FIXTURES = {"dask_address"}
_SPAWNS = re.compile(r"\bsubprocess\.(?:run|Popen|call|check_call|check_output)\b|\bjobs\.launch\(|\bLocalCluster\("
                     r"|\bmultiprocessing\b|\bmp\.spawn\(|\bSpawned(?:Service)?\(|\bserver\.start\w*\(|\bstart_shards\(")
# "module.py::test_name" (any parametrization) -> tier, for the tests that reading misjudges: processes
# started only by the code under test, or a process-starting call that is refused before it starts one
_TIER_OF = {
    "test_dashboard_apptest.py::test_a_valid_form_shows_its_command_and_launch_starts_the_job": "multiprocess",
    "test_jobs.py::test_job_ids_cannot_leave_the_registry": "unit",
}


@functools.lru_cache(maxsize=None)
def _spawning_functions(path: str) -> frozenset[str]:
    """The module-level functions of a file that start processes, directly or through one another."""
    try:
        source = Path(path).read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, SyntaxError, ValueError):
        return frozenset()
    refs: dict[str, set[str]] = {}
    spawning: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            refs[node.name] = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            if _SPAWNS.search(ast.get_source_segment(source, node) or ""):
                spawning.add(node.name)
    grew = True
    while grew:
        grew = False
        for name, used in refs.items():
            if name not in spawning and used & spawning:
                spawning.add(name)
                grew = True
    return frozenset(spawning)


def _spawns(fn) -> bool:
    fn = inspect.unwrap(fn)
    try:
        path = inspect.getsourcefile(fn)
    except TypeError:
        return False
    if path is None:
        return False
    spawning = _spawning_functions(path)
    if fn.__name__ in spawning:
        return True
    if fn.__qualname__ == fn.__name__:  # a module-level function that does not spawn
        return False
    try:  # a method or a nested function: read it, and the module's helpers it calls
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return False
    return bool(_SPAWNS.search(source)) or any(re.search(rf"\b{re.escape(n)}\(", source) for n in spawning)


def _derived_tier(item: pytest.Item) -> str:
    module = item.path.name
    if module in _BROWSER_MODULES:
        return "browser"
    if item.get_closest_marker("slow") is not None:
        return "multiprocess"
    listed = _TIER_OF.get(f"{module}::{getattr(item, 'originalname', item.name)}")
    if listed:
        return listed
    names = set(getattr(item, "fixturenames", ()))
    if names & _PROCESS_FIXTURES:
        return "multiprocess"
    fn = getattr(item, "function", None)
    if fn is not None and _spawns(fn):
        return "multiprocess"
    info = getattr(item, "_fixtureinfo", None)
    tests_dir = Path(__file__).resolve().parent
    for name in names:
        for fixturedef in (info.name2fixturedefs.get(name, ()) if info else ()):
            func = fixturedef.func
            try:
                path = Path(inspect.getsourcefile(inspect.unwrap(func)) or "").resolve()
            except TypeError:
                continue
            if path.is_relative_to(tests_dir) and _spawns(func):
                return "multiprocess"
    return "unit"


# `make test` runs the suite on two pytest-xdist workers, grouped (`--dist loadgroup`): a file's tests
# stay together (its module fixtures are built once), and the files whose tests time a job's
# processes (a kill stops the job within 10 s, an unreachable peer fails within 5 s, a straggler's
# pace) run one after another in one group, never beside each other.
TIMED_FILES = ("test_faults.py", "test_distributed.py", "test_ps.py", "test_sockets.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        explicit = {m.name for m in item.iter_markers() if m.name in TIERS}
        if len(explicit) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked with several tiers: {sorted(explicit)}")
        if not explicit:
            item.add_marker(_derived_tier(item))
        name = Path(str(item.fspath)).name
        item.add_marker(pytest.mark.xdist_group("timed" if name in TIMED_FILES else name))


# VITRINE_CHECK_TIERS=1: report the unit tests that started a process (they belong in multiprocess).
if os.environ.get("VITRINE_CHECK_TIERS"):
    import _posixsubprocess
    import platform
    import subprocess

    platform.processor()  # cached from here on: its `uname -p` is no test's process

    _started: list[int] = [0]
    _offenders: list[str] = []

    def _counting(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            _started[0] += 1
            return fn(*args, **kwargs)
        return wrapper

    _posixsubprocess.fork_exec = _counting(_posixsubprocess.fork_exec)
    if getattr(subprocess, "_fork_exec", None) is not None:  # subprocess keeps its own reference
        subprocess._fork_exec = _counting(subprocess._fork_exec)
    for _name in ("fork", "posix_spawn", "posix_spawnp"):
        if hasattr(os, _name):
            setattr(os, _name, _counting(getattr(os, _name)))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        before = _started[0]
        yield
        if _started[0] > before and item.get_closest_marker("unit") is not None:
            _offenders.append(f"{item.nodeid} ({_started[0] - before} process(es))")

    def pytest_terminal_summary(terminalreporter):
        terminalreporter.section("unit tests that started processes")
        terminalreporter.write_line("\n".join(_offenders) or "none")
