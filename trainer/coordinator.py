"""What the coordinator (rank 0, or the one process) adds to training: validation at epoch ends and the
record of mode switches in its MLflow run. The loop and the PS phase both call these, so an epoch end
is logged the same way whichever runner trained it."""

from __future__ import annotations

import math
from typing import Any


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def read_commands(control, world: int | None) -> list[tuple[str, Any]]:
    """The job's new control-channel commands (`vitrine/control.py`, written by the dashboard or `vitrine
    job`), parsed: ("stop", None), ("switch", MODE) and, in a multi-process job (`world`), ("straggler",
    Straggler). A setting that does not fit the job is reported and dropped."""
    from trainer.distributed.stragglers import Straggler
    from vitrine.errors import UserError

    out: list[tuple[str, Any]] = []
    for cmd in control.poll() if control is not None else ():
        c = cmd.get("cmd")
        if c == "stop":
            out.append(("stop", None))
        elif c == "switch" and world is not None:
            out.append(("switch", cmd["mode"]))
        elif c == "straggler" and world is not None:
            try:
                out.append(("straggler", Straggler.parse(cmd["spec"], world)))
            except UserError as exc:
                print(f"control: ignored {cmd}: {exc}", flush=True)
    return out


def step_figures(trainer, step: int, loss: float, samples_per_s: float, lr: float,
                 step_s: dict[int, float]) -> dict[str, float]:
    """The step metrics every mode logs (coordinator): loss, samples/s, lr, the image service's traffic
    and, in a multi-process job, each worker's last step time, the slowed rank and the mode."""
    from trainer.config import MODE_CODES

    m = {"loss": loss, "samples_per_s": samples_per_s, "lr": lr}
    if trainer.service is not None:
        m.update(trainer.service.meter.summary())
    if trainer.ctx is not None:
        m.update({f"worker_step_s_{r}": t for r, t in step_s.items()})
        slowed = trainer.straggler.slowed(step - 1, trainer.ctx.world, trainer.cfg.seed)
        m["straggler_rank"] = -1 if slowed is None else slowed
        m["mode_code"] = float(MODE_CODES[trainer.phase])
    return m


def end_of_epoch(trainer, logger, epoch: int | None = None, step: int | None = None, head_at: int | None = None,
                 pauses_training: bool = True) -> None:
    """Evaluate on valid (coordinator) the model after `epoch` epochs, at global step `step` (default:
    the trainer's position; a PS phase evaluates an epoch end's snapshot). `head_at`: see
    `Trainer.predict`; `pauses_training`: see `Trainer.evaluate`."""
    if "valid" in trainer.eval_loaders and trainer.is_coordinator:
        epoch = trainer.epoch if epoch is None else epoch
        step = trainer.step if step is None else step
        m = trainer.evaluate("valid", head_at, pauses_training)
        trainer.record_valid(epoch, step, m)
        if logger is not None:
            logger.log_metrics({f"valid_{k}": v for k, v in m.items() if finite(v)}, step=step)


def log_switches(trainer, logger) -> None:
    """One tag per switch, `vitrine.switch.<step>` = "<from>-><to>" (what the dashboard draws), and why."""
    if logger is None:
        return
    for step, old, new, why in trainer.switches:
        logger.set_tag(f"vitrine.switch.{step}", f"{old}->{new}")
        logger.set_tag(f"vitrine.switch_reason.{step}", why)


