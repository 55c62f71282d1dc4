"""The image descriptor of the AMS: a frozen CNN trunk whose features are computed once per image and
cached on disk, and a small trainable head that maps them to the model's image embeddings.

The paper's descriptor is VGG16 up to FC6 (4096-d, pretrained, fixed) followed by a trainable
FC 4096-256-64-12. Here the trunk is a torchvision `resnet18` (512-d after global pooling) or
`mobilenet_v3_small` (576-d), built with `weights=None`: either loaded from a local state_dict file
(`weights`: a state_dict of the torchvision model, classifier keys optional) or left at its seeded
random initialisation (no download is ever attempted). The head is feature_dim -> 256 -> 64 ->
out_dim with PReLU between layers (feature_dim: see Pooling below).

Because the trunk never trains, its features are a pure function of (trunk, weights, input size,
the image store); they are computed in batches under `torch.no_grad`, standardised per dimension
(mean/std over every row of the store) and kept as `.npy` files under the cache directory, keyed by
a hash of exactly those inputs. A second service on the same dataset loads them instead of running
the CNN again. Filling the cache at 64x64 on 2 cores: resnet18 about 500 images/s,
mobilenet_v3_small about 3000-4000 images/s.

Pooling: the classic descriptor takes the globally averaged output of the last stage
(`pooling="final"`: 512-d for resnet18, 576-d for mobilenet_v3_small). With a *random* trunk that
discards most of what the images hold: the deep random stages blur colour and texture, and an
untrained mobilenet's last stage is constant over the store. The default `pooling="stages"` takes the
per-channel mean and standard deviation over space of the output of every stage (resnet18: layer1-4,
2 x 960 = 1920-d; mobilenet_v3_small: after blocks 1, 3, 8, 12, 2 x 664 = 1328-d). A linear probe
from these cached features to the synthetic world's hidden attributes (`truth/items.parquet`; 70/30
split of the items; 1000 / 5000 items) reads, for resnet18 / mobilenet_v3_small:
colour 0.95-0.99 / 0.87-0.93 (chance 0.19-0.21), pattern 0.65-0.76 / 0.68-0.70 (0.33-0.35), shape
0.37-0.44 / 0.33-0.37 (0.23-0.24). "final" pooling: resnet18 colour 0.83-0.93, pattern 0.52-0.61,
shape 0.32-0.35; random mobilenet's is constant (chance everywhere). So a random trunk passes colour
and much of the pattern on, but hardly shape; that needs a trained trunk (`weights`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from image_service.store import INDEX, ImageStore
from vitrine.errors import UserError

# Channels of the output of each stage the features are pooled from (the last one = "final").
STAGE_CHANNELS = {"resnet18": (64, 128, 256, 512), "mobilenet_v3_small": (16, 24, 48, 576)}
TRUNK_DIMS = {name: ch[-1] for name, ch in STAGE_CHANNELS.items()}  # "final" pooling
POOLINGS = ("stages", "final")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_FORMAT = 1
STD_FLOOR = 1e-6  # dimensions whose std is below this are constant: standardised to 0


@dataclass
class DescriptorConfig:
    trunk: str = field(default="resnet18", metadata={
        "help": "frozen CNN trunk: resnet18 | mobilenet_v3_small (torchvision, built without downloads)",
        "choices": tuple(TRUNK_DIMS)})
    weights: str | None = field(default=None, metadata={
        "help": "local .pth state_dict for the trunk; unset = seeded random trunk"})
    head: tuple[int, ...] = field(default=(256, 64), metadata={
        "help": "hidden sizes of the trainable head trunk_dim -> ... -> out_dim (paper 4096-256-64-12)"})
    out_dim: int = field(default=12, metadata={"help": "image embedding dimension (the model's image_dim)"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate of the head's optimizer on the service"})
    optimizer: str = field(default="adam", metadata={
        "help": "optimizer of the head: adam | sgd (plain SGD, for exactness tests)", "choices": ("adam", "sgd")})
    seed: int = field(default=0, metadata={"help": "seed of the random trunk and of the head's initialisation"})
    input_size: int = field(default=0, metadata={
        "help": "side the images are resized to before the trunk; 0 = the store's size as is"})
    pooling: str = field(default="stages", metadata={
        "help": "trunk features: stages (mean+std over space of every stage, concatenated) | final "
                "(global average of the last stage, the classic descriptor)", "choices": POOLINGS})
    dtype: str = field(default="float32", metadata={
        "help": "dtype of the head and the embeddings: float32 | float64", "choices": ("float32", "float64")})
    batch_size: int = field(default=256, metadata={"help": "images per trunk forward pass when filling the cache"})

    def __post_init__(self) -> None:
        self.head = tuple(int(h) for h in self.head)
        if self.trunk not in TRUNK_DIMS:
            raise UserError(f"descriptor trunk {self.trunk!r}: expected one of {list(TRUNK_DIMS)}")
        if self.optimizer not in ("adam", "sgd"):
            raise UserError(f"descriptor optimizer {self.optimizer!r}: expected adam or sgd")
        if self.dtype not in ("float32", "float64"):
            raise UserError(f"descriptor dtype {self.dtype!r}: expected float32 or float64")
        if self.out_dim < 1 or any(h < 1 for h in self.head):
            raise UserError(f"descriptor sizes must be positive: head={self.head}, out_dim={self.out_dim}")
        if self.pooling not in POOLINGS:
            raise UserError(f"descriptor pooling {self.pooling!r}: expected one of {list(POOLINGS)}")
        if self.input_size < 0 or self.batch_size < 1:
            raise UserError(f"bad input_size {self.input_size} or batch_size {self.batch_size}")
        if self.lr <= 0:
            raise UserError(f"descriptor lr must be positive, got {self.lr}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32


# -- trunk -----------------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _torchvision_model(name: str) -> nn.Module:
    import torchvision

    ctor: Callable[..., nn.Module] = getattr(torchvision.models, name)
    return ctor(weights=None)


def _load_weights(model: nn.Module, name: str, path: Path) -> None:
    """Load a local state_dict into the full torchvision model; classifier keys may be absent."""
    if not path.is_file():
        raise UserError(f"trunk weights file not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and format errors come in many types
        raise UserError(f"trunk weights file {path} is not a readable torch state_dict: {e}") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"trunk weights file {path} does not hold a state_dict of tensors")
    classifier = ("fc.",) if name == "resnet18" else ("classifier.",)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise UserError(f"trunk weights file {path} does not fit a {name}: {str(e).splitlines()[0]} ...") from e
    missing = [k for k in missing if not k.startswith(classifier)]
    if missing or unexpected:
        raise UserError(
            f"trunk weights file {path} does not fit a {name}: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {list(unexpected)[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )


def feature_dim(trunk: str, pooling: str) -> int:
    """Width of the cached trunk features."""
    ch = STAGE_CHANNELS[trunk]
    return 2 * sum(ch) if pooling == "stages" else ch[-1]


def _stages(name: str, model: nn.Module) -> list[nn.Module]:
    """The torchvision model cut into consecutive stages, classifier dropped."""
    if name == "resnet18":
        m: Any = model
        return [nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1), m.layer2, m.layer3, m.layer4]
    f: Any = model.features  # type: ignore[attr-defined]
    return [f[0:2], f[2:4], f[4:9], f[9:13]]


class Trunk(nn.Module):
    """uint8 NHWC images -> ImageNet-normalised, resized NCHW -> CNN stages -> pooled (N, dim)."""

    def __init__(self, name: str, stages: list[nn.Module], pooling: str = "stages", input_size: int = 0):
        super().__init__()
        self.name = name
        self.stages = nn.ModuleList(stages)
        self.pooling = pooling
        self.dim = feature_dim(name, pooling)
        self.input_size = int(input_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def prepare(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.mean) / self.std
        if self.input_size and self.input_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=self.input_size < x.shape[-1])
        return x

    def forward(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = self.prepare(pixels)
        pooled = []
        for stage in self.stages:
            x = stage(x)
            if self.pooling == "stages":
                pooled += [x.mean(dim=(2, 3)), x.std(dim=(2, 3), correction=0)]
        if self.pooling == "final":
            pooled = [x.mean(dim=(2, 3))]
        return torch.cat(pooled, dim=1)


def build_trunk(cfg: DescriptorConfig) -> Trunk:
    """The frozen trunk of `cfg` in eval mode: seeded random init, or the weights file loaded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = _torchvision_model(cfg.trunk)
    if cfg.weights is not None:
        _load_weights(model, cfg.trunk, Path(cfg.weights))
    trunk = Trunk(cfg.trunk, _stages(cfg.trunk, model), cfg.pooling, cfg.input_size)
    trunk.eval()
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk


def _batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def extract_features(trunk: Trunk, store: ImageStore, batch_size: int = 256) -> np.ndarray:
    """Trunk features of every store row, (N, dim) float32, computed under no_grad."""
    out = np.empty((len(store), trunk.dim), dtype=np.float32)
    with torch.no_grad():
        for s, e in _batches(len(store), batch_size):
            out[s:e] = trunk(store.get(np.arange(s, e))).numpy()
    return out


# -- the feature cache -------------------------------------------------------------------------------
@dataclass
class TrunkFeatures:
    """Raw trunk features of the whole store and their per-dimension standardisation."""

    features: np.ndarray | None  # (N, dim) float32, raw (None once a service has standardised them)
    mean: np.ndarray  # (dim,) float64
    std: np.ndarray  # (dim,) float64, floored (constant dims get 1)
    key: str  # cache key (hex)
    path: Path  # the .npy file of the features
    from_cache: bool
    info: dict[str, Any]  # how they were made: trunk, weights, seconds, images/s, ...

    def standardised(self, dtype: np.dtype | type = np.float32) -> np.ndarray:
        if self.features is None:
            raise ValueError("these trunk features were released; reload them with load_or_compute")
        return ((self.features.astype(np.float64) - self.mean) / self.std).astype(dtype)


def cache_key(cfg: DescriptorConfig, store: ImageStore) -> tuple[str, dict[str, Any]]:
    """Hash of everything the trunk features depend on, and the readable material it hashes."""
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise UserError(f"trunk weights file not found: {cfg.weights}")
    weights = f"sha256:{sha256_file(Path(cfg.weights))}" if cfg.weights is not None else f"random-seed{cfg.seed}"
    material = {
        "format": CACHE_FORMAT,
        "trunk": cfg.trunk,
        "weights": weights,
        "input_size": cfg.input_size,
        "pooling": cfg.pooling,
        "store_shape": list(store.shape),
        "index_sha256": sha256_file(store.dataset_dir / INDEX),
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return key, material


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_or_compute(cfg: DescriptorConfig, store: ImageStore, cache_dir: Path) -> TrunkFeatures:
    """The store's trunk features from `cache_dir`, computing and caching them on a miss.

    Files per key: `trunk-<name>-<key16>.npy` (features), `.stats.npy` ((2, dim): mean, std) and
    `.json` (what made them). Each is written to a temp file and renamed; the features file is
    written last, so its presence means the set is complete.
    """
    key, material = cache_key(cfg, store)
    cache_dir = Path(cache_dir)
    stem = f"trunk-{cfg.trunk}-{key[:16]}"
    feat_path = cache_dir / f"{stem}.npy"
    stats_path = cache_dir / f"{stem}.stats.npy"
    info_path = cache_dir / f"{stem}.json"
    if feat_path.is_file() and stats_path.is_file():
        try:
            feats = np.load(feat_path)
            stats = np.load(stats_path)
            info = json.loads(info_path.read_text()) if info_path.is_file() else {}
            if feats.shape == (len(store), feature_dim(cfg.trunk, cfg.pooling)) and stats.shape == (2, feats.shape[1]):
                return TrunkFeatures(feats, stats[0], stats[1], key, feat_path, True, info)
        except (OSError, ValueError):
            pass  # a damaged cache is recomputed below

    trunk = build_trunk(cfg)
    t1 = time.perf_counter()
    feats = extract_features(trunk, store, cfg.batch_size)
    t2 = time.perf_counter()
    f64 = feats.astype(np.float64)
    mean = f64.mean(axis=0)
    std = f64.std(axis=0)
    std = np.where(std < STD_FLOOR, 1.0, std)
    info = {
        **material,
        "weights_file": cfg.weights,
        "images": len(store),
        "dim": int(feats.shape[1]),
        "extract_seconds": round(t2 - t1, 3),
        "images_per_second": round(len(store) / max(t2 - t1, 1e-9), 1),
        "threads": torch.get_num_threads(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    _save_npy_atomic(stats_path, np.stack([mean, std]))
    _write_text_atomic(info_path, json.dumps(info, indent=2) + "\n")
    _save_npy_atomic(feat_path, feats)
    return TrunkFeatures(feats, mean, std, key, feat_path, False, info)


# -- head --------------------------------------------------------------------------------------------
def build_head(in_dim: int, cfg: DescriptorConfig) -> nn.Sequential:
    """trunk_dim -> head sizes (Linear + PReLU each) -> out_dim (Linear), seeded by `cfg.seed`."""
    layers: list[nn.Module] = []
    d = in_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        for h in cfg.head:
            layers += [nn.Linear(d, h), nn.PReLU(h)]
            d = h
        layers.append(nn.Linear(d, cfg.out_dim))
    return nn.Sequential(*layers).to(cfg.torch_dtype)


def config_dict(cfg: DescriptorConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["head"] = list(cfg.head)
    return d
