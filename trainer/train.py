"""Single-process DICM training: the yardstick every faster mode is measured against.

One step: the batch's image ids go to the image service (`trainer.images`), the model runs on ID
embeddings and the returned image embeddings, Adam updates the model, and the embeddings' gradients
go back to the service, which updates the descriptor head. Evaluation on valid after each epoch and
on test at the end; checkpoints every `checkpoint_every` steps and at the end; one MLflow run.

The image service runs in this process (`--image-service local`), as this job's child process
(`spawn`) or elsewhere (`HOST:PORT`); the step is the same code either way (`image_service.client`).
A checkpoint holds the service's head too, and asks a remote service to write its own, so a job
whose service died resumes, with a restarted service, from the last checkpoint. SIGTERM (the
dashboard's Stop) finishes the step, writes a checkpoint and ends the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from image_service.client import ImageServiceUnavailable, LocalClient, RemoteClient, SpawnedService
from image_service.service import ImageService
from pipeline.vocab import OOV
from trainer import checkpoint, metrics
from trainer.data import BatchLoader, LoaderConfig
from trainer.distributed.stragglers import peers_median
from trainer.dataset import Dataset, open_dataset
from trainer.features import FeatureMap
from trainer.config import MODE_CODES, PS_MODES, TrainConfig
from trainer.images import image_inputs
from trainer.distributed import allreduce
from trainer.distributed.allreduce import DistContext
from trainer.distributed.launch import PS_KEY_ENV, RPC_GROUP_ENV, SERVICE_ENV
from trainer.watchdog import RUN_ID_FILE, guarded
from trainer.model import DICM
from trainer.row_optim import RowOptimizer, TableOptimizer
from trainer.ps.layout import load_optimizer_state_by_name, optimizer_state_by_name
from trainer.switching import Decision, SwitchPolicy
from trainer.coordinator import read_commands
from trainer.loop import fit
from vitrine import jobs, paths
from vitrine.errors import UserError


MODE_NAMES = {v: k for k, v in MODE_CODES.items()}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Owns the dataset, model, optimizer, image service, loaders and the run's bookkeeping."""

    def __init__(self, cfg: TrainConfig, run_dir: Path | None = None, ctx: DistContext | None = None):
        cfg.check()
        self.ctx = ctx  # None: one process
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.ds: Dataset = open_dataset(cfg.dataset)
        self.fmap = FeatureMap.from_manifest(self.ds.manifest)
        mcfg = cfg.model_config()
        if mcfg.features != "ids" and not self.ds.has_images:
            raise UserError(f"{self.ds.dir} has no image store; train with --features ids")
        _seed_everything(cfg.seed)
        self.model = DICM(self.fmap, mcfg).to(getattr(torch, cfg.dtype))
        self.spawned: SpawnedService | None = None
        self.service = self._open_image_service(run_dir) if mcfg.features != "ids" else None
        # The embedding tables get a row-wise optimizer (only touched rows), the rest --optimizer; with
        # --embedding-optimizer dense, --optimizer takes everything (the tables' whole gradients).
        tables = self.model.table_parameters() if cfg.embedding_optimizer != "dense" else {}
        self.tables = TableOptimizer(RowOptimizer(cfg.embedding_optimizer), tables) if tables else None
        self.dense_params = [p for n, p in self.model.named_parameters() if n not in tables]
        params = self.dense_params
        self.opt = (torch.optim.Adam(params, lr=cfg.lr) if cfg.optimizer == "adam" else torch.optim.SGD(params, lr=cfg.lr))
        self.exchange_bytes = 0  # all-reduce steps: bytes this worker put into the step's exchanges
        self.exchange_steps = 0
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=cfg.lr_decay_steps, gamma=cfg.lr_decay)
        # In AR every worker reads the global batch (same seed, same order) and trains on its slice.
        lcfg = LoaderConfig(batch_size=cfg.step_batch(), shuffle_buffer=cfg.shuffle_buffer,
                            max_len=cfg.max_len or None)
        self.train_loader = BatchLoader(self.ds, "train", lcfg, seed=cfg.seed, shuffle=True)
        ecfg = LoaderConfig(batch_size=cfg.eval_batch_size, shuffle_buffer=cfg.eval_batch_size, max_len=cfg.max_len or None)
        self.eval_loaders = {s: BatchLoader(self.ds, s, ecfg, seed=cfg.seed, shuffle=False)
                             for s in ("valid", "test") if self.ds.rows(s)}
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.run_id: str | None = None
        self.stop_requested = False  # the loop ends after this step (in AR: all workers agreed)
        self._stop_pending = False  # asked here (SIGTERM, control channel), not yet shared
        self.worker_step_s: list[float] = []  # last step, per worker (multi-process modes)
        # The straggler's sleep is a multiple of its own work in a step: the loop's wait for the batch,
        # the step up to the all-reduce, and (from the step before) what follows it.
        self.data_s = 0.0
        self._after_reduce_s = 0.0
        self.straggler = None
        if ctx is not None:
            from trainer.distributed.stragglers import Straggler

            self.straggler = Straggler.parse(cfg.straggler, ctx.world)
        # Multi-process jobs: the phase (ar or a PS mode) and what switches it.
        self.phase = {"auto": "ar", "single": "single"}.get(cfg.mode, cfg.mode)
        self.policy = SwitchPolicy(cfg.switch_at, cfg.mode == "auto", cfg.auto_ratio, cfg.auto_patience)
        self._switch_pending: Decision | None = None  # decided here, shared with the next all-reduce
        self.switch_to: Decision | None = None  # agreed by all workers: leave the all-reduce loop for it
        self.switches: list[tuple[int, str, str, str]] = []  # (step, from, to, why), for MLflow
        self.eval_seconds = 0.0
        self.ps = None
        if ctx is not None and os.environ.get(PS_KEY_ENV):
            self.ps = self._open_ps()
        self.control = None  # the job's control channel, read by the coordinator (vitrine/control.py)
        if self.is_coordinator and os.environ.get(jobs.ENV):
            from vitrine.control import ControlReader

            self.control = ControlReader(jobs.job_dir(os.environ[jobs.ENV]))
            jobs.set_capabilities(["stop"] + (["straggler"] if ctx is not None else [])
                                  + (["switch"] if self.ps is not None else []))

    def _open_ps(self):
        """Join the job's RPC group (the image service's, or shard 0's) and talk to the PS shards."""
        from trainer.distributed.ps_phase import PSPhase
        from vitrine import rpc_group

        group = os.environ[RPC_GROUP_ENV]
        try:
            name, _ = rpc_group.join(rpc_group.parse_address(group, RPC_GROUP_ENV), "trainer", 300.0)
        except rpc_group.GroupUnreachable as exc:
            raise UserError(f"no RPC group answers at {group} ({exc.reason}): the job's parameter-server "
                            f"shards and image service are not running there; start the job again") from None
        self._ps_joined = True
        return PSPhase(self, os.environ[PS_KEY_ENV], name)

    def set_step(self, step: int) -> None:
        """Move the global step (a PS phase ran the updates): the learning-rate schedule follows."""
        self.step = int(step)
        self.sched.last_epoch = self.step
        lr = self.cfg.lr * self.cfg.lr_decay ** (self.step // self.cfg.lr_decay_steps)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.sched._last_lr = [lr for _ in self.opt.param_groups]

    def optimizer_state(self) -> dict[str, dict[str, Any]]:
        """Every parameter's optimizer state by parameter name (what the PS shards take)."""
        out = optimizer_state_by_name(self.model, self.opt)
        if self.tables is not None:
            out.update(self.tables.state_by_name())
        return out

    def load_optimizer_state(self, state: dict[str, dict[str, Any]]) -> None:
        """The inverse of `optimizer_state` (the state read back from the PS shards)."""
        tables = self.tables.tables if self.tables is not None else {}
        load_optimizer_state_by_name(self.model, self.opt, {n: st for n, st in state.items() if n not in tables})
        if self.tables is not None:
            self.tables.load_state_by_name(state)

    # -- the state's moves: runners and the loop change the position and the mode only through these --
    def switch_phase(self, new: str, why: str) -> None:
        """Change the mode (the loop between runners; a PS runner between async and gba in place)."""
        self.switches.append((self.step, self.phase, new, why))
        print(f"step {self.step}: switching {self.phase} -> {new} ({why})", flush=True)
        self.phase = new

    def take_switch(self) -> Decision | None:
        """The switch every worker agreed on in the last all-reduce step, once."""
        switch, self.switch_to = self.switch_to, None
        return switch

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0

    def move_to(self, global_batch: int) -> None:
        """Resume the data at `global_batch` (counted over the epochs): a PS phase trained up to it."""
        self.epoch, self.batch_in_epoch = divmod(int(global_batch), len(self.train_loader))

    def set_straggler(self, straggler) -> None:
        self.straggler = straggler

    def record_valid(self, epoch: int, step: int, m: dict[str, float]) -> None:
        """The validation figures of the model after `epoch` epochs (global step `step`)."""
        self.history.append({"epoch": epoch, "step": step, **{f"valid_{k}": v for k, v in m.items()}})

    def _open_image_service(self, run_dir: Path | None):
        cfg = self.cfg
        launched = os.environ.get(SERVICE_ENV) if self.ctx is not None else None
        if cfg.image_service in ("local", "spawn") and self.ctx is not None and not launched:
            raise UserError("the workers of a multi-process job share one image service: start it with `vitrine "
                            "images serve` and pass --image-service HOST:PORT (our launcher starts one itself)")
        if cfg.image_service == "local" and not launched:
            return LocalClient(ImageService(self.ds.dir, cfg.descriptor_config()))
        if cfg.image_service == "spawn" and not launched:
            if run_dir is None:
                raise UserError("--image-service spawn needs the run directory (its checkpoints go there)")
            self.spawned = SpawnedService(self.ds.dir, cfg.descriptor_config(), Path(run_dir) / "image_service",
                                          start_timeout_s=600)
            address = self.spawned.address
        elif launched:  # a worker of our launcher: the service it started for the job
            address = launched
        else:
            address = cfg.image_service
        try:
            client = RemoteClient(address, worker=None if self.ctx is None else self.ctx.rank)
            _check_service(client, self.ds, cfg)
        except BaseException:
            if self.spawned is not None:
                self.spawned.stop()
            raise
        return client

    def close(self) -> None:
        """Leave the service's RPC group, and stop the service if this job started it."""
        if isinstance(self.service, RemoteClient):
            self.service.close()  # leave the group first; then the service can go (SIGTERM) without a fuss
        if getattr(self, "_ps_joined", False):
            from vitrine import rpc_group

            # Not graceful: a graceful leave of a dynamic group takes a token in the group's store and
            # asks every member; a worker SIGKILLed while holding it (PS modes tolerate that) or gone
            # before it is asked makes every other member wait for the store's timeout. Nothing is in
            # flight here: a PS phase waits for its pushes before it ends.
            rpc_group.leave(graceful=False)
            self._ps_joined = False
        if self.spawned is not None:
            self.spawned.stop()
            self.spawned = None

    # -- one step ----------------------------------------------------------------------------------
    def train_step(self, batch: dict[str, torch.Tensor], data_s: float = 0.0) -> float:
        """One synchronous step (single, or all-reduce over the workers) on the next batch of the data;
        moves the step and the position in the epoch. `data_s`: the wait for this batch (a straggler's
        sleep is a multiple of its own work, this included)."""
        t0 = time.perf_counter()
        self.data_s = data_s
        self.model.train()
        # Drawn over the global batch and keyed by its number, so every mode drops the same rows.
        batch = self.drop_ad_ids(batch, self.epoch * len(self.train_loader) + self.batch_in_epoch)
        share = 1.0
        if self.ctx is not None:
            batch, share = allreduce.shard(batch, self.ctx)
        img = image_inputs(batch, self.service, self.model.uses_ad_image, self.model.uses_hist_images, train=True)
        loss = self.forward_backward(batch, img, share)
        if self.ctx is None and self.control is not None:
            self._control_commands()
        if self.ctx is not None:
            own_s = self.data_s + (time.perf_counter() - t0) + self._after_reduce_s
            pause = self.straggler.delay(self.ctx.rank, self.step, self.ctx.world, own_s, self.cfg.seed,
                                         peers_median(dict(enumerate(self.worker_step_s)), self.ctx.rank))
            if pause:
                time.sleep(pause)
            new_straggler = self._control_commands()  # may ask to stop: read before the flag is sent
            # A stop asked during the all-reduce stays pending and goes out with the next step, so all
            # workers end after the same step (one that stopped alone would leave the others waiting).
            pending = self._stop_pending
            switch, self._switch_pending = self._switch_pending, None
            rep = allreduce.all_reduce_step(self.dense_params, self.ctx, float(loss.detach()), pending,
                                            own_s + pause, new_straggler,
                                            MODE_CODES[switch.to] if switch else 0)
            self.exchange_bytes += rep.bytes
            self.exchange_steps += 1
            if self.tables is not None:  # (row, gradient) pairs of the global batch: bytes set by the batch
                rows, sent = allreduce.exchange_rows(self.tables.local_gradients(), self.ctx)
                self.exchange_bytes += sent
            t_reduced = time.perf_counter()
            self.stop_requested = rep.stop
            self.worker_step_s = rep.step_s
            if rep.switch:  # every worker leaves the all-reduce loop after this step
                self.switch_to = switch or Decision(MODE_NAMES[rep.switch], "coordinator")
            elif self.is_coordinator and self.ps is not None:
                d = (self.policy.due(self.step + 1, self.phase)
                     or self.policy.observe(self.phase, dict(enumerate(rep.step_s)), [], self.ctx.world))
                if d is not None and d.to in PS_MODES:
                    self._switch_pending = d
            if rep.straggler is not None:  # every worker switches at the same step
                from trainer.distributed.stragglers import Straggler

                self.straggler = Straggler.from_tuple(rep.straggler)
            loss = torch.tensor(rep.loss)
        elif self.tables is not None:
            rows = self.tables.local_gradients()
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        if self.tables is not None:
            self.tables.step(rows, self.cfg.table_lr(lr))
        self.sched.step()
        img.push_gradients(self.service, token=self.step)
        if self.service is not None:
            self.service.count_samples(int(batch["label"].shape[0]))
        if self.ctx is not None:
            self._after_reduce_s = time.perf_counter() - t_reduced
        self.step += 1
        self.batch_in_epoch += 1
        return float(loss.detach())

    def forward_backward(self, batch: dict[str, torch.Tensor], img, share: float) -> torch.Tensor:
        """Forward, the loss (mean BCE over this worker's rows, x `share` so that the workers' gradients
        average to the global batch's), and its gradients into `.grad` (every mode's step)."""
        self.model.train()
        logits = self.model(batch, img.ad, img.hist)
        loss = F.binary_cross_entropy_with_logits(logits, batch["label"].to(logits.dtype)) * share
        self.model.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def request_stop(self) -> None:
        """Stop after the current step (one process) or after the next step all workers agree on (AR)."""
        self._stop_pending = True
        if self.ctx is None:
            self.stop_requested = True

    def _control_commands(self) -> tuple[float, float, float] | None:
        """Apply the job's new control commands (coordinator); returns a new straggler setting to share."""
        new = None
        for c, value in read_commands(self.control, None if self.ctx is None else self.ctx.world):
            if c == "stop":
                self.request_stop()
            elif c == "switch":
                self._switch_command(value)
            elif c == "straggler":
                new = value.as_tuple()
        return new

    def _switch_command(self, mode: str) -> None:
        """A switch asked through the control channel, in the all-reduce phase (the PS phase has its own)."""
        if self.ps is None:
            print(f"control: switch to {mode} ignored: this job has no parameter server", flush=True)
            return
        d = self.policy.asked(mode, self.phase)
        if d is not None and d.to in PS_MODES:
            self._switch_pending = d

    def drop_ad_ids(self, batch: dict[str, torch.Tensor], number: int) -> dict[str, torch.Tensor]:
        """Cold items reach the model with OOV item and image IDs; show it such rows in training. The
        draw depends on the seed and the global batch's number only, so all modes drop the same rows."""
        if not self.cfg.id_dropout:
            return batch
        gen = torch.Generator().manual_seed((self.cfg.seed + 1) * 1_000_003 + number)
        drop = torch.rand(batch["label"].shape[0], generator=gen) < self.cfg.id_dropout
        batch = dict(batch)
        for name in ("item_id", "image_id"):
            if name in batch:
                batch[name] = torch.where(drop, torch.full_like(batch[name], OOV), batch[name])
        return batch

    # -- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, split: str, head_at: int | None = None) -> dict[str, np.ndarray]:
        """`head_at`: read image embeddings from the service's head as of that global step (a PS phase's
        evaluation, whose model is that step's snapshot) instead of its live head."""
        self.model.eval()
        out: dict[str, list[np.ndarray]] = {k: [] for k in ("p", "y", "group", "cold", "impression_id")}
        for batch in self.eval_loaders[split].epoch(0):
            img = image_inputs(batch, self.service, self.model.uses_ad_image, self.model.uses_hist_images, train=False,
                               head_at=head_at)
            p = torch.sigmoid(self.model(batch, img.ad, img.hist))
            out["p"].append(p.double().numpy())
            out["y"].append(batch["label"].numpy())
            out["group"].append(batch["group_id"].numpy())
            out["cold"].append(batch["cold_item"].numpy())
            out["impression_id"].append(batch["impression_id"].numpy())
        return {k: np.concatenate(v) for k, v in out.items()}

    def evaluate(self, split: str, head_at: int | None = None, pauses_training: bool = True) -> dict[str, float]:
        """`pauses_training`: the time counts as evaluation, not training (false in a PS phase, where the
        other workers train on while the coordinator evaluates)."""
        t0 = time.perf_counter()
        try:
            return self._evaluate(split, head_at)
        finally:
            if pauses_training:
                self.eval_seconds += time.perf_counter() - t0

    def _evaluate(self, split: str, head_at: int | None = None) -> dict[str, float]:
        pred = self.predict(split, head_at)
        oracle_p = None
        oracle = self.ds.oracle()
        if oracle is not None:
            oracle_p = (oracle.set_index("impression_id")["p_click"].reindex(pred["impression_id"]).to_numpy())
            if np.isnan(oracle_p).any():
                oracle_p = None
        return metrics.evaluate(pred["y"], pred["p"], pred["group"], pred["cold"], oracle_p)

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def is_coordinator(self) -> bool:
        return self.ctx is None or self.ctx.is_coordinator

    def save_checkpoint(self, run_dir: Path, resume_at: int | None = None) -> None:
        """The trainer's checkpoint, with the service's state; a remote service also writes its own.
        In AR every replica holds the same state, so only the coordinator writes it. `resume_at`: the
        global batch a resume starts from, when it is not the trainer's position (a PS phase's)."""
        if not self.is_coordinator:
            return
        st = self.state()
        if resume_at is not None:
            st["epoch"], st["batch_in_epoch"] = divmod(int(resume_at), len(self.train_loader))
        if self.service is not None:
            self.service.checkpoint(self.step)
        checkpoint.save(run_dir, st)

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "table_optimizer": self.tables.state_by_name() if self.tables is not None else None,
            "scheduler": self.sched.state_dict(),
            "service": self.service.state_dict() if self.service is not None else None,
            "rng": torch.get_rng_state(), "config": asdict(self.cfg), "run_id": self.run_id,
            "history": self.history, "phase": self.phase, "policy": self.policy.state(), "switches": self.switches,
        }

    def load_state(self, st: dict[str, Any]) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        if self.tables is not None:
            self.tables.load_state_by_name(st["table_optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        if self.service is not None and st["service"] is not None:
            self.service.load_state_dict(st["service"])
        torch.set_rng_state(st["rng"])
        self.step, self.epoch, self.batch_in_epoch = st["step"], st["epoch"], st["batch_in_epoch"]
        if self.ctx is not None and st.get("phase") in ("ar", *PS_MODES):
            self.phase = st["phase"] if self.ps is not None or st["phase"] == "ar" else "ar"
            # Checkpoints from before the switching policy kept only its auto flag.
            self.policy.load(st.get("policy", {"auto": st.get("auto", self.policy.auto)}))
            self.switches = [tuple(x) for x in st.get("switches", [])]
        self.run_id = st.get("run_id")
        self.history = st.get("history", [])


def _run_dir(cfg: TrainConfig, name: str) -> Path:
    return Path(cfg.run_dir).resolve() if cfg.run_dir else paths.data_root() / "runs" / name


def _check_service(client: RemoteClient, ds: Dataset, cfg: TrainConfig) -> None:
    """A running service must serve this dataset's store with the model's embedding size and dtype."""
    info = client.info()
    n = int(ds.manifest["images"]["shape"][0])
    problems = []
    if client.out_dim != cfg.image_dim:
        problems.append(f"embeddings of {client.out_dim} dims, the model wants --image-dim {cfg.image_dim}")
    if info["dtype"] != cfg.dtype:
        problems.append(f"dtype {info['dtype']}, the model is {cfg.dtype}")
    if client.n_images != n:
        problems.append(f"{client.n_images} images, the dataset {ds.dir} has {n}")
    if problems:
        raise UserError(f"the image service at {client.address} does not fit this job: " + "; ".join(problems))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training job; returns the final metrics and where things went.

    A new job gets a run directory of its own (a random suffix: two jobs started in the same second
    with the same settings do not share one). A job that fails before its first checkpoint removes the
    directory it created, so a failed start leaves nothing to `--resume`."""
    if cfg.resume:
        run_dir = Path(cfg.resume).resolve()
        st = checkpoint.load(run_dir)
        # Runs from before --packing were unpacked; from before the row-wise optimizers, dense.
        saved = {"packing": False, "embedding_optimizer": "dense", **st["config"]}
        # The run continues with its own settings; only the progress display and where the image
        # service is (a restarted one may listen elsewhere) may differ.
        keep = {"progress": cfg.progress, "image_service": cfg.image_service if cfg.image_service != "local"
                else saved.get("image_service", "local")}
        cfg = TrainConfig(**{**saved, "mlp": tuple(saved["mlp"]), "resume": str(run_dir),
                             "run_dir": str(run_dir), **keep})
        name = run_dir.name
    else:
        st = None
        cfg.check()
        name = new_run_name(cfg)
        run_dir = _run_dir(cfg, name)
    ctx = allreduce.from_env() if cfg.mode != "single" else None
    if ctx is not None:  # a worker: the launcher (ours or torchrun) made the directory
        if not cfg.run_dir:
            raise UserError("a worker of a multi-process job needs --run-dir (the same for every rank)")
        if ctx.world != cfg.workers:
            raise UserError(f"WORLD_SIZE={ctx.world} but --workers {cfg.workers}; give every rank the same --workers")
        run_dir.mkdir(parents=True, exist_ok=True)
        return _worker(cfg, ctx, st, run_dir, name)
    with claim_run_dir(run_dir, st) as created:
        if cfg.mode != "single":
            # The launcher: start the workers (and the image service) and wait for them.
            from trainer.distributed.launch import launch

            return launch(cfg, run_dir)
        with guarded(run_dir, created):  # the job is this one process: a guardian reports a kill
            return _worker(cfg, None, st, run_dir, name)


def new_run_name(cfg: TrainConfig) -> str:
    """What the job is, when it started, and a random part: two jobs with the same settings started in
    the same second do not share a run directory."""
    agg = "" if cfg.features == "ids" else f"-{cfg.aggregator}"  # ids models aggregate no images
    return f"dicm-{cfg.features}{agg}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, st: dict[str, Any] | None):
    """Hold the run directory for this job: refuse one that holds another run or that another job
    holds (a lock that dies with its process), and remove it if this job created it and failed before
    its first checkpoint. Yields whether this job created the directory."""
    import fcntl
    import shutil

    if st is None and (run_dir / checkpoint.NAME).exists():
        raise UserError(f"{run_dir} already holds a run; pass --resume {run_dir} to continue it, or another --run-dir")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / ".lock", "w")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another job is running in {run_dir}; wait for it or pick another --run-dir") from None
        yield created
    except BaseException:
        if created and not (run_dir / checkpoint.NAME).exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        lock.close()


def _worker(cfg: TrainConfig, ctx: DistContext | None, st: dict[str, Any] | None, run_dir: Path,
            name: str) -> dict[str, Any]:
    """This process's part of the job: the whole job in single mode, one rank otherwise."""
    helpers = None
    if ctx is not None:
        from trainer.watchdog import watch_launcher

        watch_launcher(run_dir, ctx.is_coordinator)
        allreduce.init_group(ctx)
        if not os.environ.get(PS_KEY_ENV):
            helpers = _start_helpers_under_torchrun(cfg, ctx, run_dir)
        if not ctx.is_coordinator:
            cfg = replace(cfg, track=False, progress=False)  # only the coordinator logs, evaluates, checkpoints
    try:
        trainer = Trainer(cfg, run_dir, ctx)
        try:
            return _train(trainer, cfg, st, run_dir, name)
        finally:
            trainer.close()
            if ctx is not None:
                allreduce.shutdown()
    except BaseException:
        if ctx is not None:
            from trainer.watchdog import report_if_orphaned

            if report_if_orphaned():  # a collective failed because the launcher (and its workers) went
                os._exit(1)
        raise
    finally:
        if helpers is not None:
            helpers.stop()


def _start_helpers_under_torchrun(cfg: TrainConfig, ctx: DistContext, run_dir: Path):
    """Under torchrun (no launcher of ours): rank 0 starts the job's PS shards and image service, on
    MASTER_ADDR (the address every node reaches rank 0's machine by, with torchrun's static rendezvous),
    and tells every worker where they are. They run as rank 0's children and end with it; the job's
    other processes are torchrun's to watch. Returns them on rank 0 (which stops them at the end)."""
    import torch.distributed as dist

    from trainer.distributed.launch import JobHelpers

    helpers, found = None, [None]
    if ctx.is_coordinator:
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        try:
            helpers = JobHelpers.start(cfg, run_dir, host=host)
            found = [helpers.env()]
        except UserError as exc:
            found = [{"error": str(exc)}]
    dist.broadcast_object_list(found, src=0)  # the others wait here while rank 0 starts them
    if "error" in found[0]:
        raise UserError(found[0]["error"])
    os.environ.update(found[0])
    return helpers


def _train(trainer: Trainer, cfg: TrainConfig, st: dict[str, Any] | None, run_dir: Path, name: str) -> dict[str, Any]:
    if st is not None:
        trainer.load_state(st)
    if trainer.is_coordinator:
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    logger = None
    if cfg.track:
        from trainer.tracking import RunLogger

        tags = {"vitrine.dataset": str(trainer.ds.dir), "vitrine.mode": cfg.mode, "vitrine.run_dir": str(run_dir),
                "vitrine.image_service": cfg.image_service}
        if os.environ.get("VITRINE_JOB_ID"):
            tags["vitrine.job_id"] = os.environ["VITRINE_JOB_ID"]
        logger = RunLogger(trainer.run_id, cfg, run_name=name, tags=tags)
        trainer.run_id = logger.run_id
        # The launcher marks the run FAILED if this process is killed: it needs the id before anything else.
        from vitrine.atomic import write_text_atomic

        write_text_atomic(run_dir / RUN_ID_FILE, logger.run_id)
        from vitrine import tracking

        jobs.record_mlflow_run(logger.run_id, tracking.tracking_uri())  # the job registry ends it if all die
        logger.log_dict(asdict(cfg), "config.json")
        if isinstance(trainer.service, RemoteClient):
            logger.log_dict({"address": trainer.service.address, **trainer.service.info()}, "image_service.json")
    restore = _stop_on_sigterm(trainer)  # before the first checkpoint: from then on a SIGTERM is a clean stop
    if st is None:
        trainer.save_checkpoint(run_dir)  # step 0: a job whose image service dies early can still --resume
    try:
        result = fit(trainer, run_dir, logger)
    except KeyboardInterrupt:
        _save_if_service_alive(trainer, run_dir)
        if logger is not None:
            logger.close("KILLED")
        raise
    except ImageServiceUnavailable as exc:
        last = checkpoint.load(run_dir)["step"]
        how = ("it starts a new service, which resumes from its own checkpoint" if cfg.image_service == "spawn"
               else "after restarting the service; it resumes from its own checkpoint")
        if logger is not None:
            logger.set_tag("vitrine.error", str(exc)[:4000])
            logger.close("FAILED")
        raise UserError(f"{exc}\nTraining stopped at step {trainer.step}. The last checkpoint (step {last}, "
                        f"model and descriptor together) is in {run_dir}: continue with "
                        f"`vitrine train --resume {run_dir}` ({how}).") from None
    except BaseException:
        if logger is not None:
            logger.close("FAILED")
        raise
    finally:
        restore()
    if trainer.service is not None:
        result["ams"] = _ams_summary(trainer)
        if logger is not None:
            logger.log_metrics({f"final_{k}": v for k, v in result["ams"].items()}, step=trainer.step)
    if logger is not None:
        if not result.get("stopped"):
            from trainer.serving import log_model

            log_model(trainer, logger, cfg.model_name)
        logger.close("KILLED" if result.get("stopped") else "FINISHED")
    result.update(run_dir=str(run_dir), run_id=trainer.run_id)
    if trainer.is_coordinator:
        (run_dir / "result.json").write_text(json.dumps(result, indent=2, default=float))
    return result


def _ams_summary(trainer: Trainer) -> dict[str, float]:
    """The client's traffic figures plus the service's own dedup (which also merges concurrent workers)."""
    out = trainer.service.meter.summary()
    c = trainer.service.counters
    out["service_dedup_ratio"] = c["ids_requested"] / max(c["unique_ids_computed"], 1)
    out["service_updates"] = float(c.get("updates", 0))
    return out


def _save_if_service_alive(trainer: Trainer, run_dir: Path) -> None:
    try:
        trainer.save_checkpoint(run_dir)
    except ImageServiceUnavailable:
        pass  # the last complete checkpoint stays


def _stop_on_sigterm(trainer: Trainer):
    """SIGTERM asks for a clean stop after the current step; returns a function that undoes this."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        trainer.request_stop()

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)

