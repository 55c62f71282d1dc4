"""A killed process is a normal event: SIGKILL one process of a real job mid-run, then resume it with
the command the job printed. The harness is `benchmarks/fault_table.py` (which prints the whole fault
table of docs/DISTRIBUTED.md); these are the cases CI runs. Each case checks the failure model: the job
stops within 10 s with one line naming what died and the resume command (or, for a PS-mode worker,
goes on), nothing is left behind, the MLflow run is not left RUNNING, and the resumed job ends where an
uninterrupted one does (AR: equal to 1e-9 in float64; PS modes: the same step count, no step logged
twice)."""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import fault_table  # noqa: E402


@pytest.mark.parametrize("spec, reference", [
    ("launcher:single", True),  # the job is one process: its guardian reports and marks the run
    ("coordinator:gba", False),  # rank 0 dies: the others must not train on without it
    ("worker:ar", True),  # an AR worker dies: the job stops; the resumed run equals the uninterrupted one
    ("shard:auto", False),  # the PS shard dies
    ("service:gba+images", False),  # the job's image service dies
    ("launcher:gba", False),  # the launcher dies: its workers and helpers go with it
    ("worker:gba", False),  # a PS-mode worker dies holding a token: the job goes on, no batch lost
])
def test_a_killed_process_stops_the_job_cleanly_and_it_resumes(world_dataset, tmp_path, spec, reference):
    case = fault_table.parse_cases(spec)[0]
    out = fault_table.run_case(case, world_dataset, tmp_path, reference=reference)
    assert not out.problems, "\n".join(out.problems)
    if case.victim == "worker" and case.mode == "gba":
        assert out.went_on and out.steps == fault_table.expected_steps(world_dataset, case)
    else:
        assert out.stop_s <= fault_table.STOP_LIMIT_S and out.mlflow_status in ("FAILED", "KILLED")
        assert f"vitrine train --resume {tmp_path}" in out.line, out.line
