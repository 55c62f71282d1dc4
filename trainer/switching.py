"""When a multi-process job changes mode: one policy for every switch, that decides and applies none.

Three sources ask for a switch, and all of them go through `SwitchPolicy`:

- planned: `--switch-at S:MODE[,...]`, due once S global steps are done (the first step in the new
  mode is S+1, in either direction);
- asked: the control channel's `switch` command (the dashboard), `auto` included, which turns the
  auto rule on (any other mode turns it off);
- auto (`--mode auto`, or asked): from all-reduce to GBA when the slowest worker's step time stays
  above `--auto-ratio` x the median for `--auto-patience` steps in a row; back to all-reduce when it
  stays below for as long, every live worker has timed a step of the phase (a straggler's first step
  is its slowest: without it the rest look healthy) and no worker is lost (all-reduce needs them all).

The policy returns a `Decision` (the mode to go to, and why, which the run's MLflow tags record); the
coordinator hands it to whichever runner is in charge (the all-reduce step shares it with every worker;
in a PS phase the token book ends the phase on a whole global batch). Like Ray Train's scaling policy,
it is a pure function of what it is shown, so it can be tested without a job.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

@dataclass(frozen=True)
class Decision:
    to: str  # "ar" | "async" | "gba"
    why: str


def parse_switch_at(spec: str | None) -> list[tuple[int, str]]:
    """`--switch-at 100:gba,200:ar` -> [(100, "gba"), (200, "ar")] (checked by TrainConfig.check)."""
    out = []
    for part in (spec or "").split(","):
        if part.strip():
            step, mode = part.strip().split(":")
            out.append((int(step), mode))
    return sorted(out)


def slowest_over_median(step_s: list[float]) -> float:
    """How many times the slowest worker's step time is the median's (1.0 with fewer than 2 workers)."""
    times = [t for t in step_s if t > 0]
    if len(times) < 2:
        return 1.0
    med = statistics.median(times)
    return max(times) / med if med > 0 else 1.0


def slowest_ratio(step_s: dict[int, float], lost: list[int], world: int) -> float | None:
    """slowest/median step time of the live workers in a PS phase, or None until every live worker has
    timed a step of the phase."""
    live = [r for r in range(world) if r not in lost]
    if not all(step_s.get(r, 0) > 0 for r in live):
        return None
    return slowest_over_median([v for r, v in step_s.items() if int(r) not in lost])


class SwitchPolicy:
    """The job's switching rules. State: the planned switches not yet due, whether auto is on, and the
    auto rule's count of consecutive steps on the far side of the threshold."""

    def __init__(self, switch_at: str | None, auto: bool, ratio: float, patience: int):
        self.planned = parse_switch_at(switch_at)
        self.auto = auto
        self.ratio, self.patience = ratio, patience
        self._count = 0

    # -- planned ---------------------------------------------------------------------------------------
    def due(self, steps_done: int, phase: str) -> Decision | None:
        """The planned switch due after `steps_done` global steps, if any (a planned switch to the mode
        the job is in is dropped)."""
        while self.planned and steps_done >= self.planned[0][0]:
            step, mode = self.planned.pop(0)
            if mode != phase:
                self._count = 0
                return Decision(mode, f"planned at step {step} (--switch-at)")
        return None

    def take_planned(self, mode: str) -> tuple[int, Decision] | None:
        """The next planned switch to `mode`, taken out now (a PS phase gives a planned switch to
        all-reduce to its token book, which ends the phase exactly after that step)."""
        at = next((i for i, (_, m) in enumerate(self.planned) if m == mode), None)
        if at is None:
            return None
        step, _ = self.planned.pop(at)
        return step, Decision(mode, f"planned at step {step} (--switch-at)")

    # -- asked -----------------------------------------------------------------------------------------
    def asked(self, mode: str, phase: str, lost: list[int] = ()) -> Decision | None:
        """A `switch` command from the control channel: `auto` turns the auto rule on; any other mode
        turns it off and switches there, unless the job is in it already or (to all-reduce) has lost a
        worker. Raises ValueError with the reason for a switch that cannot be made."""
        self.auto = mode == "auto"
        self._count = 0
        if mode == "auto" or mode == phase:
            return None
        if mode == "ar" and lost:
            raise ValueError(f"switch to ar refused: workers {sorted(lost)} are lost")
        return Decision(mode, "asked")

    # -- auto ------------------------------------------------------------------------------------------
    def observe(self, phase: str, step_s: dict[int, float], lost: list[int], world: int) -> Decision | None:
        """The auto rule, shown each worker's last step time: from ar to gba when one straggles, from
        gba back to ar when none does."""
        if not self.auto:
            return None
        if phase == "ar":
            r = slowest_over_median(list(step_s.values()))
            self._count = self._count + 1 if r > self.ratio else 0
            if self._count >= self.patience:
                self._count = 0
                return Decision("gba", f"auto: slowest/median {r:.1f} > {self.ratio} for {self.patience} steps")
            return None
        if phase != "gba":
            return None
        r = slowest_ratio(step_s, lost, world)
        if r is None:
            return None
        self._count = self._count + 1 if r < self.ratio else 0
        if self._count >= self.patience and not lost:
            self._count = 0
            return Decision("ar", f"auto: slowest/median {r:.1f} < {self.ratio} for {self.patience} steps")
        return None

    # -- checkpoints -----------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"planned": list(self.planned), "auto": self.auto}

    def load(self, st: dict) -> None:
        self.planned = [tuple(x) for x in st.get("planned", self.planned)]
        self.auto = bool(st.get("auto", self.auto))
