"""The modes' runners: `sync` (single process and all-reduce) and `ps` (async and gba on the parameter
server). Each has `run(trainer, run_dir, logger, total, bar) -> Outcome`; the loop in
`trainer/loop.py` drives them."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.switching import Decision


@dataclass(frozen=True)
class Outcome:
    """How a runner's phase ended: "done" (the data is used up), "stopped" (asked) or "switch" (to
    `switch.to`, agreed by every worker, at a global-batch boundary), and the phase's own figures."""

    kind: str
    switch: Decision | None = None
    figures: dict[str, float] = field(default_factory=dict)  # a PS phase's (coordinator), for the loop
