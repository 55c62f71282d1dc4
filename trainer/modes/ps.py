"""The runner of the parameter-server modes (async and gba), on every worker of the job.

`run` opens the phase (the coordinator hands the state to the shards, everyone meets at a barrier),
runs `PSPhase.run` and closes it the way shard 0 said: "done" (the data is used up), "stop" (asked
through the control channel or SIGTERM) or "ar" (back to all-reduce: the loop makes the switch). The
worker's own steps are `PSPhase`'s (`trainer/distributed/ps_phase.py`). On worker 0 the `_Coordinator`
hook runs after each of its steps: control channel, the auto rule, MLflow figures, valid evaluation
at epoch ends, checkpoints.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from trainer.coordinator import end_of_epoch, log_switches, read_commands, step_figures
from trainer.modes import Outcome
from trainer.switching import Decision
from vitrine import jobs
from vitrine.errors import UserError


SHARD_FIGURES = ("tokens_applied", "tokens_decayed", "tokens_dropped", "staleness_p50", "staleness_p90", "staleness_p99")


def run(trainer, run_dir: Path, logger, total: int, bar) -> Outcome:
    ps = trainer.ps
    if ps is None:
        raise UserError(f"mode {trainer.phase} needs the job's parameter server; start the job with "
                        f"`vitrine train --mode {trainer.phase} --workers N` (the launcher starts the shards)")
    cfg = trainer.cfg
    spe = len(trainer.train_loader)
    first = trainer.epoch * spe + trainer.batch_in_epoch
    end = min(cfg.epochs * spe, first + max(total - trainer.step, 0))
    if trainer.is_coordinator:
        ps.enter(trainer.phase, first, end)
    dist.barrier()
    ps.start(trainer.phase, first)
    hook = _Coordinator(trainer, run_dir, logger, total, bar, spe) if trainer.is_coordinator else None
    kind, next_batch = ps.run(hook)
    if kind == "ar":
        dist.barrier()  # every worker's pushes are in
        if trainer.is_coordinator:
            ps.client.configure("idle", trainer.ctx.world, cfg.gba_threshold, cfg.gba_decay)
            figures = _close_service(trainer, ps)
            ps._service_policy("ar")  # before the barrier: the workers' next image pushes are all-reduce's
        dist.barrier()  # the shards are flushed
        ps.load_from_ps()
        if trainer.is_coordinator:
            _evaluate_missed(trainer, hook, logger, next_batch)
        trainer.move_to(next_batch)
        phase = _phase_figures(ps, figures, hook.close()) if trainer.is_coordinator else {}
        return Outcome("switch", Decision("ar", hook.switch_why if hook is not None else "coordinator"), phase)
    if not trainer.is_coordinator:
        return Outcome("stopped" if kind == "stop" else "done")
    lost = ps.wait_for_workers()
    if lost:
        print(f"workers {lost} were lost during the PS phase", flush=True)
    ps.client.configure("idle", trainer.ctx.world, cfg.gba_threshold, cfg.gba_decay)
    figures = _close_service(trainer, ps)
    ps.load_from_ps()
    final = hook.close()
    _evaluate_missed(trainer, hook, logger, next_batch)
    log_switches(trainer, logger)
    return Outcome("stopped" if kind == "stop" else "done", None, _phase_figures(ps, figures, final))


# Counts that start afresh with each PS phase (the service's policy is new each time); the shards'
# figures, the token book's and this worker's traffic run over the whole job already.
_PER_PHASE = ("image_tokens_applied", "image_tokens_decayed", "image_tokens_dropped", "image_gba_updates")


def _evaluate_missed(trainer, hook: "_Coordinator", logger, next_batch: int) -> None:
    """Coordinator, at a PS phase's end with the live state loaded from the idle shards: evaluate the
    epoch ends the phase passed that its hook did not (it evaluates when its own next token is in a
    new epoch, and it may get none). An end at `next_batch` itself is the live state; earlier ones come
    from the snapshots. Leaves the trainer's position at `next_batch`."""
    epochs, in_epoch = divmod(next_batch, hook.spe)
    seen = {int(h["epoch"]) for h in trainer.history}
    from_snapshots = [e for e in range(trainer.epoch + 1, epochs + (in_epoch > 0)) if e not in seen]
    for e in from_snapshots:
        hook._evaluate_epoch_end(e, pauses_training=True)  # the phase is over: nobody trains meanwhile
    if from_snapshots:
        trainer.ps.load_from_ps()
    trainer.move_to(next_batch)
    if in_epoch == 0 and epochs > 0 and epochs not in seen:
        end_of_epoch(trainer, logger)


def _close_service(trainer, ps) -> dict[str, float]:
    """Coordinator, the shards idle: apply the image head's partial global batch (as `configure` applied
    the shards') and read the PS and service figures before anything replaces the service's policy:
    a switch to all-reduce does, and its GBA figures went with it."""
    if trainer.service is not None:
        trainer.service.flush()
    return gba_figures(ps.client, trainer.service)


def _phase_figures(ps, figures: dict[str, float], report: dict[str, Any]) -> dict[str, float]:
    """A finished PS phase's figures (coordinator), whichever way it ended: this worker's traffic and
    waits, the shards' and the service's token figures, and the tokens each worker trained on in the
    job's PS phases (the book counts over the job: a straggler's share shows how slow it really was)."""
    from trainer.distributed.ps_phase import stats

    out = {**stats(ps), **figures}
    out.update({f"worker_tokens_{r}": float(n) for r, n in report["steps"].items()})
    return out


def fold_phases(job: dict[str, float], phase: dict[str, float]) -> dict[str, float]:
    """The job's PS figures after one more phase (the loop keeps them for the result and MLflow). A
    job's phases add up: ar -> gba -> ar -> gba reports the tokens of both GBA phases; the image
    service's staleness percentiles are its last phase's."""
    out = dict(phase)
    for k in _PER_PHASE:
        if k in out:
            out[k] += job.get(k, 0.0)
    return out


class _Coordinator:
    """Worker 0's duties between its own steps in a PS phase."""

    def __init__(self, trainer, run_dir: Path, logger, total: int, bar, spe: int):
        self.t, self.run_dir, self.logger, self.total, self.bar, self.spe = trainer, run_dir, logger, total, bar, spe
        self.client = trainer.ps.client
        self.last_step = trainer.step
        self.window_t = time.perf_counter()
        self.samples = 0
        self.loss_sum, self.loss_n = 0.0, 0
        self.asked_ar = False
        self.switch_why = "asked"
        self.moved_at = self.checked_at = time.monotonic()  # the step's last move, the last ping of the workers
        self.known_lost: list[int] = []
        self.step_s: dict[int, float] = {}
        # A planned switch to all-reduce is the token book's to make, at a batch known now: "S:ar" ends
        # the phase after step S, as "S:gba" from all-reduce begins it after step S.
        planned = trainer.policy.take_planned("ar")
        if planned is not None:
            step, decision = planned
            self.client.tokens("set_command", "ar", step + 1 + trainer.ps.batch_minus_step)
            self.switch_why = decision.why

    def __call__(self, tok: dict[str, Any] | None) -> None:
        t = self.t
        self._control()
        rep = self.client.tokens("report")
        self.samples += rep["samples"]
        if rep["loss"] is not None:
            self.loss_sum, self.loss_n = self.loss_sum + rep["loss"], self.loss_n + 1
        self.step_s = {int(r): v for r, v in rep["step_s"].items()}
        step = int(rep["step"])
        self._find_lost(step)
        if not self.asked_ar:
            d = t.policy.due(step, t.phase) or t.policy.observe(t.phase, self.step_s, rep["lost"], t.ctx.world)
            if d is not None:
                self._apply(d)
        if step != self.last_step:
            crossed = lambda every: step // every != self.last_step // every  # noqa: E731
            t.set_step(step)
            if crossed(t.cfg.log_every):
                self._log(step, rep)
            if self.bar is not None:
                self.bar.update(step - self.last_step)
            jobs.report_progress(step, self.total, epoch=t.epoch)
            if crossed(t.cfg.checkpoint_every):
                self._checkpoint(rep)
            self.last_step = step
        if tok is not None and int(tok["batch"]) // self.spe > t.epoch:
            now = t.step
            # Every epoch end since this worker's last token, not only the newest: while it evaluated one,
            # the others may have trained through a whole epoch (small epochs, a slow evaluation).
            for epoch in range(t.epoch + 1, int(tok["batch"]) // self.spe + 1):
                self._evaluate_epoch_end(epoch)
            t.set_step(now)
            t.move_to(int(tok["batch"]))

    def _find_lost(self, step: int, stalled_s: float = 2.0) -> None:
        """When the global step has not moved for `stalled_s`, ping the workers: one that does not answer
        is lost, and the token it held goes to another (a worker died holding it)."""
        now = time.monotonic()
        if step != self.last_step:
            self.moved_at = now
        elif now - self.moved_at > stalled_s and now - self.checked_at > stalled_s:
            self.checked_at = now
            new = sorted(set(self.client.check_workers(timeout_s=stalled_s)) - set(self.known_lost))
            if new:
                self.known_lost += new
                print(f"workers {new} stopped answering; the tokens they held go to the others", flush=True)

    def _evaluate_epoch_end(self, epoch: int, pauses_training: bool = False) -> None:
        """The model and image head after `epoch` epochs (snapshots of that step), logged at that step;
        the live state when a snapshot is missing (e.g. the service drops pushes the shards keep, so its
        step lags). Mid-phase the other workers keep taking tokens meanwhile, so unlike an all-reduce
        step's evaluation this time is not a pause of training: it stays in train_seconds."""
        from vitrine.snapshots import SnapshotMissing

        t = self.t
        at = t.ps.load_epoch_end(epoch)
        if at is not None:
            try:
                end_of_epoch(t, self.logger, epoch, at, head_at=at if t.service is not None else None,
                             pauses_training=pauses_training)
                return
            except SnapshotMissing as exc:
                print(f"epoch {epoch}: evaluating the live state, not the epoch's end: {exc}", flush=True)
        t.ps.load_from_ps()
        end_of_epoch(t, self.logger, epoch, pauses_training=pauses_training)

    def _apply(self, d) -> None:
        """Carry out a switch decision in a PS phase: to all-reduce through the token book (at the next
        global-batch boundary); between async and gba in place."""
        t = self.t
        if d.to == "ar":
            self._ask_ar(d.why)
        elif d.to != t.phase:
            t.ps.set_mode(d.to)
            t.switch_phase(d.to, d.why)

    def _ask_ar(self, why: str) -> None:
        self.client.tokens("set_command", "ar")
        self.asked_ar = True
        self.switch_why = why

    def _control(self) -> None:
        t = self.t
        if t._stop_pending:
            self.client.tokens("set_command", "stop")
        for c, value in read_commands(t.control, t.ctx.world):
            if c == "stop":
                t.request_stop()
                self.client.tokens("set_command", "stop")
            elif c == "straggler":
                t.set_straggler(value)
                self.client.tokens("set_straggler", value.as_tuple())
            elif c == "switch" and not self.asked_ar:
                lost = self.client.tokens("report")["lost"] if value == "ar" else []
                try:
                    d = t.policy.asked(value, t.phase, lost)
                except ValueError as exc:
                    print(f"control: {exc}", flush=True)
                    continue
                if d is not None:
                    self._apply(d)

    def _log(self, step: int, rep: dict[str, Any]) -> None:
        now = time.perf_counter()
        sps = self.samples / max(now - self.window_t, 1e-9)
        loss = self.loss_sum / self.loss_n if self.loss_n else float("nan")
        self.window_t, self.samples, self.loss_sum, self.loss_n = now, 0, 0.0, 0
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{sps:,.0f}")
        if self.logger is None:
            return
        t = self.t
        lr = t.cfg.lr * t.cfg.lr_decay ** (step // t.cfg.lr_decay_steps)
        m = step_figures(t, step, loss, sps, lr, self.step_s)
        m.update({"tokens_issued": float(rep["issued"]), "workers_lost": float(len(rep["lost"]))})
        m.update(gba_figures(self.client, t.service))
        self.logger.log_metrics({k: v for k, v in m.items() if v == v}, step=step)

    def _checkpoint(self, rep: dict[str, Any]) -> None:
        t = self.t
        t.ps.load_from_ps()
        # The checkpoint resumes at the global batch after the last one the shards applied (the state's
        # step, plus the offset of a resumed phase): batches in flight when it was taken are handed out
        # again, so a resumed job trains as many global batches as an uninterrupted one. (Resuming after
        # every batch handed out lost the ones in flight: 111 of 112 steps.)
        t.save_checkpoint(self.run_dir, resume_at=t.step + t.ps.batch_minus_step)

    def close(self) -> dict[str, Any]:
        rep = self.client.tokens("report")
        self._log(self.t.step, rep)
        return rep


def gba_figures(client, service) -> dict[str, float]:
    """Shard 0's token figures, and the image service's own prefixed `image_`: its pushes are weighed
    by its own aggregator (with its own threshold and decay, possibly), so the shards' figures do not
    tell what happened to the descriptor head's gradients. A PS phase's service is always remote."""
    shard0 = client.counters()[0]
    out = {k: float(shard0[k]) for k in SHARD_FIGURES if k in shard0}
    if service is not None:
        out.update({f"image_{k}": float(v) for k, v in service.info()["policy"].items()
                    if k.startswith(("tokens_", "staleness_", "gba_updates", "threshold", "decay"))
                    and k != "tokens_issued"})
    return out
