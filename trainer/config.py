"""The training job's settings, kept free of heavy imports so that `vitrine --help` and the dashboard's
forms can read them without loading torch."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from vitrine.config import help_meta as _h
from vitrine.errors import UserError

MODES = ("single", "ar", "async", "gba", "auto")
PS_MODES = ("async", "gba")
MODE_CODES = {"single": 0, "ar": 1, "async": 2, "gba": 3}


@dataclass
class DataSettings:
    """What it trains on, in what batches and for how long."""

    dataset: str = field(default="data/processed/demo", metadata=_h("processed dataset directory"))
    epochs: int = field(default=2, metadata=_h("passes over the train split (the paper converges in about 2)"))
    batch_size: int = field(default=1024, metadata=_h("samples per step"))
    max_steps: int = field(default=0, metadata=_h("stop after this many steps (0 = run all epochs)"))
    max_len: int = field(default=0, metadata=_h("behaviours per sample; 0 = the dataset's"))
    shuffle_buffer: int = field(default=65_536, metadata=_h("rows in the loader's shuffle buffer"))
    eval_batch_size: int = field(default=4096, metadata=_h("samples per evaluation batch"))


@dataclass
class DistributionSettings:
    """How many processes train and how they share the work (docs/DISTRIBUTED.md)."""

    mode: str = field(default="single", metadata=_h(
        "single (one process) | ar (synchronous all-reduce over --workers processes) | async (parameter "
        "server, each gradient applied on arrival) | gba (parameter server, global-batch aggregation) | auto "
        "(ar while the workers keep pace, gba while one straggles)", choices=MODES))
    workers: int = field(default=1, metadata=_h("worker processes (multi-process modes)"))
    ps_shards: int = field(default=1, metadata=_h("parameter-server shard processes (multi-process modes)"))
    global_batch: int = field(default=0, metadata=_h(
        "samples per step over all workers (0 = batch_size x workers); each worker takes its share"))
    image_service: str = field(default="local", metadata=_h(
        "where the image descriptor runs: local (in this process) | spawn (its own process, started and "
        "stopped by this job) | HOST:PORT of a running `vitrine images serve`"))
    straggler: str | None = field(default=None, metadata=_h(
        "slow a worker on purpose: RANK:FACTOR, random:P:FACTOR or none (multi-process modes)"))
    max_staleness: int = field(default=-1, metadata=_h(
        "PS modes: hold a token back until its batch is at most this many steps ahead of the global step "
        "(0 = synchronous over the PS, -1 = never hold back)"))
    switch_at: str | None = field(default=None, metadata=_h(
        "planned switches STEP:MODE[,STEP:MODE...] (e.g. 100:gba,200:ar), for reproducible experiments"))
    auto_ratio: float = field(default=1.5, metadata=_h(
        "auto: switch to gba when the slowest worker's step time is above this multiple of the median"))
    auto_patience: int = field(default=5, metadata=_h(
        "auto: steps the ratio must stay above (or, to switch back to ar, below) the threshold"))


@dataclass
class ModelSettings:
    """The DICM model, its image descriptor, and how it learns (the same in every mode)."""

    features: str = field(default="ids+images", metadata=_h("ids | ids+ad_image | ids+behavior_images | ids+images",
                                                            choices=("ids", "ids+ad_image", "ids+behavior_images", "ids+images")))
    aggregator: str = field(default="attentive", metadata=_h("behaviour-image aggregation",
                                                             choices=("sum", "max", "attentive", "multi_query")))
    embed_dim: int = field(default=12, metadata=_h("ID embedding dimension"))
    image_dim: int = field(default=12, metadata=_h("image embedding dimension"))
    mlp: tuple[int, ...] = field(default=(200, 80), metadata=_h("hidden sizes of the final MLP"))
    trunk: str = field(default="resnet18", metadata=_h("frozen CNN trunk of the descriptor", choices=("resnet18", "mobilenet_v3_small")))
    trunk_weights: str | None = field(default=None, metadata=_h("local .pth weights for the trunk (default: seeded random)"))
    dtype: str = field(default="float32", metadata=_h("dtype of the model and the descriptor head (float64 for "
                                                      "exactness checks)", choices=("float32", "float64")))
    id_dropout: float = field(default=0.2, metadata=_h("share of training rows whose ad item and image IDs are replaced by OOV, so the model learns to score items it has no ID for (cold start)"))
    optimizer: str = field(default="adam", metadata=_h("adam (paper) or sgd", choices=("adam", "sgd")))
    lr: float = field(default=1e-3, metadata=_h("learning rate of the model and of the descriptor head"))
    embedding_optimizer: str = field(default="rowwise_adagrad", metadata=_h(
        "optimizer of the embedding tables: rowwise_adagrad (one accumulator per row) or lazy_adam update "
        "only the rows a batch touches, so a step costs the same for any vocabulary (trainer/row_optim.py); "
        "dense: --optimizer over whole tables", choices=("rowwise_adagrad", "lazy_adam", "dense")))
    embedding_lr: float | None = field(default=None, metadata=_h(
        "learning rate of the embedding tables (default: the optimizer's own, trainer/row_optim.py "
        "TABLE_LR: 4e-3 lazy_adam, 3e-2 rowwise_adagrad; --lr for dense); it follows --lr's decay"))
    lr_decay: float = field(default=0.9, metadata=_h("multiply the learning rate by this every lr_decay_steps"))
    lr_decay_steps: int = field(default=24_000, metadata=_h("steps between learning-rate decays (paper: 24k)"))


@dataclass
class GBASettings:
    """GBA's staleness rules, for the PS shards and the image service (vitrine/gba.py)."""

    gba_threshold: int = field(default=2, metadata=_h("gba: staleness (global steps) a gradient keeps full weight"))
    gba_decay: float = field(default=0.5, metadata=_h("gba: weight factor per step of staleness beyond the threshold"))
    image_gba_threshold: int | None = field(default=None, metadata=_h(
        "gba: the image service's staleness threshold (default: --gba-threshold)"))
    image_gba_decay: float | None = field(default=None, metadata=_h(
        "gba: the image service's decay per step beyond its threshold (default: --gba-decay)"))


@dataclass
class PicassoSettings:
    """PICASSO's optimizations (docs/PICASSO.md), each a switch of its own."""

    packing: bool = field(default=True, metadata=_h(
        "PICASSO packing: all embedding tables in one, one lookup per forward, one PS pull per shard "
        "(--no-packing: a table and a lookup per vocabulary, a PS pull per table and shard)"))
    interleave: int = field(default=0, metadata=_h(
        "PICASSO interleaving: prepare this many batches ahead on a background thread (data; in PS modes "
        "also their tokens, PS pulls and image embeddings) while the current one computes"))
    cache_rows: float = field(default=0.0, metadata=_h(
        "PS modes: cache this share of each table's hottest rows (by training frequency), and the dense "
        "tensors, on the worker (0 = no cache)"))
    cache_images: float = field(default=0.0, metadata=_h(
        "PS modes: cache this share of the hottest images' embeddings on the worker, checked against the "
        "descriptor head's version (0 = no cache; measured to cost test AUC on the default world)"))
    cache_staleness: int = field(default=2, metadata=_h(
        "PS modes: global steps a cached row, or descriptor-head versions a cached image embedding, may be "
        "old before it is re-read"))


@dataclass
class RunSettings:
    """Where the run goes, what it logs, and how it is resumed."""

    seed: int = field(default=0, metadata=_h("seed of initialisation and data order"))
    run_dir: str | None = field(default=None, metadata=_h("where checkpoints go (default data/runs/<run name>)"))
    resume: str | None = field(default=None, metadata=_h("run directory of a killed run to continue"))
    checkpoint_every: int = field(default=500, metadata=_h("steps between checkpoints"))
    log_every: int = field(default=10, metadata=_h("steps between logged step metrics"))
    track: bool = field(default=True, metadata=_h("log the run to MLflow"))
    model_name: str | None = field(default=None, metadata=_h(
        "registered model the run's model becomes a version of (default vitrine-<dataset name>)"))
    progress: bool = field(default=True, metadata=_h("show a progress bar"))

    threads: int = field(default=0, metadata=_h("torch threads (0 = all cores)"))


@dataclass
class TrainConfig(RunSettings, PicassoSettings, GBASettings, ModelSettings, DistributionSettings, DataSettings):
    """Every setting of a training job: the six groups above, flattened into one set of `vitrine train`
    flags (and the dashboard's Launch form), in the groups' order. Code that needs one group can take
    that type (a TrainConfig is each of them)."""

    def step_batch(self) -> int:
        """Samples per optimizer step: the global batch in multi-process modes."""
        if self.mode == "single":
            return self.batch_size
        return self.global_batch or self.batch_size * self.workers

    def model_config(self):
        from trainer.model import ModelConfig

        return ModelConfig(embed_dim=self.embed_dim, mlp=self.mlp, features=self.features,
                           aggregator=self.aggregator, image_dim=self.image_dim, packing=self.packing,
                           sparse=self.embedding_optimizer != "dense")

    def table_lr(self, lr: float) -> float:
        """The embedding tables' learning rate when the dense layers' is `lr` (the same schedule)."""
        from trainer.row_optim import TABLE_LR

        base = self.embedding_lr if self.embedding_lr is not None else TABLE_LR.get(self.embedding_optimizer)
        return lr if base is None else lr * base / self.lr

    def image_gba(self) -> tuple[int, float]:
        """(threshold, decay) of the image service's gba policy: the PS's unless set on their own."""
        return (self.gba_threshold if self.image_gba_threshold is None else self.image_gba_threshold,
                self.gba_decay if self.image_gba_decay is None else self.image_gba_decay)

    def descriptor_config(self):
        from image_service.descriptor import DescriptorConfig

        return DescriptorConfig(trunk=self.trunk, weights=self.trunk_weights, out_dim=self.image_dim, lr=self.lr,
                                optimizer=self.optimizer, seed=self.seed, dtype=self.dtype)

    def problems(self) -> list[UserError]:
        """Every bad setting, each a UserError naming its `--flag`: `vitrine train` exits 2 with the
        first, the dashboard's Launch form shows each under its field (it also keeps every path inside
        the data root, `vitrine.paths.check_inside`; a terminal user may write wherever they can)."""
        from vitrine.paths import check_run_dir_name

        out: list[UserError] = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                out.append(UserError(msg))

        for name in ("epochs", "batch_size", "eval_batch_size", "checkpoint_every", "log_every", "lr_decay_steps",
                     "embed_dim", "image_dim"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        need(self.max_steps >= 0, f"--max-steps must be >= 0 (0 = run all epochs; got {self.max_steps})")
        for name in ("max_len", "shuffle_buffer", "threads"):
            need(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        need(all(int(h) >= 1 for h in self.mlp), f"--mlp sizes must be >= 1 (got {' '.join(map(str, self.mlp))})")
        need(self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number (got {self.lr})")
        need(self.embedding_lr is None or (self.embedding_lr > 0 and math.isfinite(self.embedding_lr)),
             f"--embedding-lr must be a positive number (got {self.embedding_lr})")
        need(0 <= self.id_dropout < 1, f"--id-dropout must be in [0, 1) (got {self.id_dropout})")
        need(self.workers >= 1, f"--workers must be >= 1 (got {self.workers})")
        need(self.global_batch >= 0, f"--global-batch must be >= 0 (0 = batch_size x workers; got {self.global_batch})")
        need(not (self.mode == "single" and self.workers > 1),
             "--workers needs a multi-process --mode (ar, async, gba, auto); single mode is one process")
        need(self.max_staleness >= -1, f"--max-staleness must be >= -1 (-1 = never hold back; got {self.max_staleness})")
        need(not (self.features == "ids" and self.aggregator != "attentive"),
             f"--aggregator {self.aggregator} aggregates behaviour images, which --features ids does not use; "
             "leave --aggregator out or choose image features")
        for part in (self.switch_at or "").split(","):
            if not part.strip():
                continue
            step, _, mode = part.strip().partition(":")
            if not step.isdigit() or mode not in ("ar", "async", "gba"):
                out.append(UserError(f"--switch-at {self.switch_at!r}: expected STEP:MODE[,STEP:MODE] with MODE ar, "
                                     f"async or gba (e.g. 100:gba,200:ar)"))
                break
            if self.mode == "single":
                out.append(UserError("--switch-at needs a multi-process --mode"))
                break
        need(self.interleave >= 0, f"--interleave must be >= 0 (got {self.interleave})")
        need(0 <= self.cache_rows <= 1 and 0 <= self.cache_images <= 1 and self.cache_staleness >= 0,
             f"--cache-rows and --cache-images must be in [0, 1] and --cache-staleness >= 0 (got "
             f"{self.cache_rows}, {self.cache_images}, {self.cache_staleness})")
        need(self.ps_shards >= 1, f"--ps-shards must be >= 1 (got {self.ps_shards})")
        need(self.gba_threshold >= 0 and 0 <= self.gba_decay <= 1,
             f"--gba-threshold must be >= 0 and --gba-decay in [0, 1] (got {self.gba_threshold}, {self.gba_decay})")
        need((self.image_gba_threshold is None or self.image_gba_threshold >= 0) and (
            self.image_gba_decay is None or 0 <= self.image_gba_decay <= 1),
            f"--image-gba-threshold must be >= 0 and --image-gba-decay in [0, 1] (got "
            f"{self.image_gba_threshold}, {self.image_gba_decay})")
        need(self.auto_ratio > 1 and self.auto_patience >= 1,
             f"--auto-ratio must be > 1 and --auto-patience >= 1 (got {self.auto_ratio}, {self.auto_patience})")
        need(not (self.global_batch and self.workers >= 1 and self.global_batch < self.workers),
             f"--global-batch {self.global_batch} gives some of the {self.workers} workers no samples")
        need(0 < self.lr_decay <= 1, f"--lr-decay must be in (0, 1] (got {self.lr_decay})")
        need(self.model_name is None or bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", self.model_name)),
             f"--model-name {self.model_name!r}: letters, digits, '_', '.' and '-' only (at most 100, first a "
             f"letter or digit)")
        try:
            if self.straggler:
                if self.mode == "single":
                    raise UserError("--straggler slows one worker of a multi-process --mode (ar, async, gba, auto)")
                from trainer.distributed.stragglers import Straggler

                Straggler.parse(self.straggler, max(self.workers, 1))
        except UserError as exc:
            out.append(exc)
        try:
            if self.image_service not in ("local", "spawn"):
                from image_service.client import parse_address

                parse_address(self.image_service)
        except UserError as exc:
            out.append(exc)
        if self.run_dir:
            try:
                check_run_dir_name(self.run_dir, "--run-dir")
            except UserError as exc:
                out.append(exc)
        return out

    def check(self) -> None:
        """Raise the first of `problems()`."""
        found = self.problems()
        if found:
            raise found[0]
