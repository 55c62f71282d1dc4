"""The Deep Image CTR Model (DICM, "Image Matters", CIKM 2018): a pure `nn.Module`.

Inputs (one batch, as the loader produces it; see trainer/features.py for the fields):

* every categorical field -> LongTensor (B,), every behaviour sequence field -> LongTensor (B, L)
  right-padded with 0, `hist_len` (B,);
* optionally the image embeddings computed by the image service: `ad_image_emb` (B, image_dim) and
  `hist_image_emb` (B, L, image_dim). The model never sees pixels; the caller asks the service for
  the embeddings of `batch["ad_image"]` / `batch["hist_image"]`, passes them in as leaf tensors
  with `requires_grad`, and sends their gradients back to the service.

Architecture:

* one 12-d embedding table per vocabulary, shared by the fields naming it (`hist_item_id` looks up
  `item_id`'s table); index 0 (padding) is a zero vector that never trains. The image-id fields are
  plain ID features in every variant (the paper's baseline), so image gains come from content;
* DIN attention over the behaviour ID sequence: query = the ad's embeddings of every field that a
  behaviour sequence mirrors (item, category, image id), keys = the same fields of each behaviour
  (see trainer/layers.py for the weighting); sequence fields without an ad counterpart are
  masked-sum pooled;
* behaviour images aggregated by `sum`, `max`, `attentive` (query: the ad image embedding, or the ad
  category embedding when the variant has no ad image) or `multi_query` (two attentive channels,
  queried by the ad image and by the ad category, concatenated);
* MLP 200-80 with PReLU over the concatenation of everything, then one logit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from trainer.features import FeatureMap, Field
from trainer.layers import MLP, AttentionPooling, masked_max, masked_sum, pack
from vitrine.errors import UserError

FEATURES = ("ids", "ids+ad_image", "ids+behavior_images", "ids+images")
AGGREGATORS = ("sum", "max", "attentive", "multi_query")
EMBED_STD = 0.05  # N(0, std) init of embedding rows (row 0 = padding stays 0)


@dataclass
class ModelConfig:
    embed_dim: int = field(default=12, metadata={"help": "dimension of every ID embedding"})
    mlp: tuple[int, ...] = field(default=(200, 80), metadata={"help": "hidden sizes of the final MLP (PReLU)"})
    attention_mlp: tuple[int, ...] = field(
        default=(64, 16), metadata={"help": "hidden sizes of the attention MLPs (PReLU), output 1"})
    features: str = field(default="ids+images", metadata={
        "help": "which image features the model uses: ids | ids+ad_image | ids+behavior_images | ids+images",
        "choices": FEATURES})
    aggregator: str = field(default="attentive", metadata={
        "help": "behaviour-image aggregation: sum | max | attentive | multi_query", "choices": AGGREGATORS})
    image_dim: int = field(default=12, metadata={"help": "dimension of the image embeddings (descriptor out_dim)"})
    packing: bool = field(default=False, metadata={
        "help": "one embedding table for every vocabulary (per-vocabulary row offsets) and one lookup per "
                "forward, instead of a table and a lookup per field (PICASSO's packing)"})
    sparse: bool = field(default=False, metadata={
        "help": "embedding tables give sparse gradients (only the looked-up rows), for the row-wise "
                "optimizers of trainer/row_optim.py; the forward pass is the same"})

    def __post_init__(self) -> None:
        self.mlp = tuple(int(h) for h in self.mlp)
        self.attention_mlp = tuple(int(h) for h in self.attention_mlp)
        if self.features not in FEATURES:
            raise UserError(f"model features {self.features!r}: expected one of {list(FEATURES)}")
        if self.aggregator not in AGGREGATORS:
            raise UserError(f"model aggregator {self.aggregator!r}: expected one of {list(AGGREGATORS)}")
        if self.embed_dim < 1 or self.image_dim < 1:
            raise UserError(f"embed_dim and image_dim must be positive, got {self.embed_dim}, {self.image_dim}")
        if any(h < 1 for h in self.mlp + self.attention_mlp):
            raise UserError(f"MLP sizes must be positive, got mlp={self.mlp}, attention_mlp={self.attention_mlp}")
        if self.aggregator == "multi_query" and self.features == "ids+behavior_images":
            raise UserError(
                "aggregator multi_query queries with the ad image embedding, which features "
                "'ids+behavior_images' leaves out; use features 'ids+images' or another aggregator"
            )

    @property
    def uses_ad_image(self) -> bool:
        return self.features in ("ids+ad_image", "ids+images")

    @property
    def uses_hist_images(self) -> bool:
        return self.features in ("ids+behavior_images", "ids+images")


def _key(vocab: str) -> str:
    """A ModuleDict-safe key for a vocabulary name."""
    return vocab.replace(".", "_")


class DICM(nn.Module):
    """Deep Image CTR Model; `forward(batch, ad_image_emb, hist_image_emb)` -> logits (B,)."""

    def __init__(self, fmap: FeatureMap, cfg: ModelConfig | None = None):
        super().__init__()
        cfg = cfg or ModelConfig()
        self.fmap = fmap
        self.cfg = cfg
        self.uses_ad_image: bool = cfg.uses_ad_image
        self.uses_hist_images: bool = cfg.uses_hist_images
        if (self.uses_ad_image or self.uses_hist_images) and not fmap.has_images:
            raise UserError(f"model features {cfg.features!r} need images, but the dataset has no image fields")
        if not fmap.categorical:
            raise UserError("the dataset has no categorical fields for the model to embed")
        d = cfg.embed_dim

        # One table per vocabulary (fields naming it share it), or all of them packed into one: row 0
        # is the shared padding row, vocabulary v's row i >= 1 is packed row start[v] + i - 1.
        self.embeddings = nn.ModuleDict()
        self.packed: nn.Embedding | None = None
        self.start: dict[str, int] = {}
        if cfg.packing:
            total = 1
            for vocab, size in fmap.vocabs.items():
                self.start[vocab] = total
                total += max(size - 1, 0)
            self.packed = nn.Embedding(total, d, padding_idx=0, sparse=cfg.sparse)
            nn.init.normal_(self.packed.weight, std=EMBED_STD)
            with torch.no_grad():
                self.packed.weight[0].zero_()
            # Every categorical field's offset into the packed table, so that the (B, F) matrix of their
            # ids becomes packed rows in one operation however many fields there are.
            self.register_buffer("cat_offsets", torch.tensor(
                [self.start[str(f.vocab)] - 1 for f in fmap.categorical], dtype=torch.long),
                persistent=False)
        self._cat_position = {f.name: i for i, f in enumerate(fmap.categorical)}
        for vocab, size in ({} if cfg.packing else fmap.vocabs).items():
            k = _key(vocab)
            if k in self.embeddings:
                raise UserError(f"vocabulary names {vocab!r} and another collide as {k!r}")
            table = nn.Embedding(size, d, padding_idx=0, sparse=cfg.sparse)
            nn.init.normal_(table.weight, std=EMBED_STD)
            with torch.no_grad():
                table.weight[0].zero_()
            self.embeddings[k] = table

        # Behaviour ID sequences: those mirroring an ad field go into DIN attention, the rest are summed.
        self.paired: list[tuple[Field, Field]] = []
        self.unpaired: list[Field] = []
        for s in fmap.sequences:
            a = fmap.ad_field_for(s)
            if a is None:
                self.unpaired.append(s)
            else:
                self.paired.append((s, a))
        self.id_attention = AttentionPooling(d * len(self.paired), cfg.attention_mlp) if self.paired else None

        # The ID field used as the image-attention query when there is no ad image (and by multi_query).
        self.query_field: Field | None = None
        self.query_proj: nn.Module | None = None
        self.image_attention: AttentionPooling | None = None
        self.image_attention_cat: AttentionPooling | None = None
        agg = cfg.aggregator
        if self.uses_hist_images and agg in ("attentive", "multi_query"):
            self.image_attention = AttentionPooling(cfg.image_dim, cfg.attention_mlp)
            if agg == "multi_query":
                self.image_attention_cat = AttentionPooling(cfg.image_dim, cfg.attention_mlp)
            if agg == "multi_query" or not self.uses_ad_image:
                self.query_field = self._pick_query_field(fmap)
                if d != cfg.image_dim:
                    self.query_proj = nn.Linear(d, cfg.image_dim, bias=False)

        in_dim = d * len(fmap.categorical) + d * len(self.paired) + d * len(self.unpaired)
        if self.uses_ad_image:
            in_dim += cfg.image_dim
        if self.uses_hist_images:
            in_dim += cfg.image_dim * (2 if agg == "multi_query" else 1)
        self.mlp_in_dim = in_dim
        self.mlp = MLP(in_dim, cfg.mlp, out_dim=1)

    @staticmethod
    def _pick_query_field(fmap: FeatureMap) -> Field:
        """The ad category field (by name, then vocabulary); else the first ad-group ID field."""
        cats = fmap.categorical
        for pick in (
            lambda f: f.name == "category_id",
            lambda f: f.vocab == "category_id" and f.group == "ad",
            lambda f: f.group == "ad",
        ):
            hit = [f for f in cats if pick(f)]
            if hit:
                return hit[0]
        return cats[0]

    def table_parameters(self) -> dict[str, nn.Parameter]:
        """The embedding tables by parameter name (`packed.weight`, or `embeddings.<vocab>.weight`)."""
        if self.packed is not None:
            return {"packed.weight": self.packed.weight}
        return {f"embeddings.{k}.weight": t.weight for k, t in self.embeddings.items()}

    def table(self, f: Field) -> nn.Embedding:
        """The embedding table a field looks up (unpacked models)."""
        assert f.vocab is not None
        return self.embeddings[_key(f.vocab)]  # type: ignore[return-value]

    def rows(self, f: Field, ids: Tensor) -> tuple[str, Tensor]:
        """The embedding parameter a field's ids read and the rows they read in it."""
        assert f.vocab is not None
        return self.vocab_rows(f.vocab, ids)

    def vocab_rows(self, vocab: str, ids: Tensor) -> tuple[str, Tensor]:
        if self.packed is None:
            return f"embeddings.{_key(vocab)}.weight", ids
        return "packed.weight", torch.where(ids > 0, ids + (self.start[vocab] - 1), torch.zeros_like(ids))

    def read_rows(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every embedding row a batch reads (padding included), per parameter name, sorted unique:
        what a parameter-server worker pulls. Packed, the categorical fields are mapped at once."""
        if self.packed is not None:
            parts = [self._packed_categorical(batch).reshape(-1)]
            parts += [self.rows(f, batch[f.name])[1].reshape(-1) for f in self.fmap.sequences]
            return {"packed.weight": torch.unique(torch.cat(parts))}
        touched: dict[str, list[Tensor]] = {}
        for f in self.fmap.categorical + self.fmap.sequences:
            name, rows = self.rows(f, batch[f.name])
            touched.setdefault(name, []).append(rows.reshape(-1))
        return {name: torch.unique(torch.cat(parts)) for name, parts in touched.items()}

    def _packed_categorical(self, batch: Mapping[str, Tensor]) -> Tensor:
        """(B, F) packed rows of the categorical fields, in the feature map's order."""
        ids = torch.stack([batch[f.name] for f in self.fmap.categorical], dim=1)
        return torch.where(ids > 0, ids + self.cat_offsets, torch.zeros_like(ids))

    def lookup(self, lookups: list[tuple[Field, Tensor]]) -> list[Tensor]:
        """Embeddings of several fields' ids (any shapes), one lookup per field (unpacked models; the
        packed forward does all of its lookups in one)."""
        return [self.table(f)(ids) for f, ids in lookups]

    def pack_state_from(self, unpacked: "DICM") -> None:
        """Copy an unpacked model's parameters into this packed one (same feature map and sizes)."""
        assert self.packed is not None and unpacked.packed is None
        with torch.no_grad():
            for vocab, start in self.start.items():
                w = unpacked.embeddings[_key(vocab)].weight
                self.packed.weight[start:start + w.shape[0] - 1] = w[1:]
            mine = dict(self.named_parameters())
            for n, p in unpacked.named_parameters():
                if not n.startswith("embeddings."):
                    mine[n].copy_(p)

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        batch: Mapping[str, Tensor],
        ad_image_emb: Tensor | None = None,
        hist_image_emb: Tensor | None = None,
    ) -> Tensor:
        mask: Tensor | None = None
        if self.fmap.sequences or self.uses_hist_images:
            hist_len = batch["hist_len"]
            L = self._seq_len(batch, hist_image_emb)
            mask = torch.arange(L, device=hist_len.device).unsqueeze(0) < hist_len.reshape(-1, 1)
        # Every ID lookup of the forward pass at once (one operation when the tables are packed).
        seq_lookups: list[tuple[Field, Tensor]] = []
        rows = cols = None
        if self.id_attention is not None:
            assert mask is not None
            rows, cols = pack(mask)  # look up only the real positions
            seq_lookups += [(s, batch[s.name][rows, cols]) for s, _ in self.paired]
        seq_lookups += [(s, batch[s.name]) for s in self.unpaired]
        nc = len(self.fmap.categorical)
        if self.packed is None:
            embs = self.lookup([(f, batch[f.name]) for f in self.fmap.categorical] + seq_lookups)
            cat_emb = {f.name: e for f, e in zip(self.fmap.categorical, embs[:nc])}
            parts = list(cat_emb.values())
            embs = embs[nc:]
        else:
            # Packed: the categorical fields' (B, F) rows and the sequences' rows in one lookup; the
            # fields' embeddings stay one (B, F * d) block (the same values as their concatenation).
            cat_rows = self._packed_categorical(batch)
            flat = torch.cat([cat_rows.reshape(-1)] + [self.rows(f, ids)[1].reshape(-1) for f, ids in seq_lookups])
            out = self.packed(flat)
            B = cat_rows.shape[0]
            cat3 = out[:B * nc].reshape(B, nc, -1)
            embs = [o.reshape(*ids.shape, o.shape[-1]) for o, (_, ids) in
                    zip(out[B * nc:].split([ids.numel() for _, ids in seq_lookups]), seq_lookups)]
            cat_emb = _Columns(cat3, self._cat_position)
            parts = [cat3.reshape(B, -1)]
        B = parts[0].shape[0]

        if self.id_attention is not None:
            assert mask is not None and rows is not None and cols is not None
            query = torch.cat([cat_emb[a.name] for _, a in self.paired], dim=-1)
            keys = torch.cat(embs[:len(self.paired)], dim=-1)
            parts.append(self.id_attention.forward_packed(query, keys, rows, cols, mask.shape[1]))
        for s, e in zip(self.unpaired, embs[len(self.paired):]):
            assert mask is not None
            parts.append(masked_sum(e, mask))

        if self.uses_ad_image:
            ad_image_emb = self._check_image(ad_image_emb, "ad_image_emb", (B, self.cfg.image_dim))
            parts.append(ad_image_emb)
        if self.uses_hist_images:
            assert mask is not None
            hist_image_emb = self._check_image(
                hist_image_emb, "hist_image_emb", (B, mask.shape[1], self.cfg.image_dim))
            parts.extend(self._aggregate_images(hist_image_emb, mask, ad_image_emb, cat_emb))

        return self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)

    def _seq_len(self, batch: Mapping[str, Tensor], hist_image_emb: Tensor | None) -> int:
        if self.fmap.sequences:
            return int(batch[self.fmap.sequences[0].name].shape[1])
        if hist_image_emb is not None:
            return int(hist_image_emb.shape[1])
        return int(batch["hist_image"].shape[1])

    @staticmethod
    def _check_image(t: Tensor | None, name: str, shape: tuple[int, ...]) -> Tensor:
        if t is None:
            raise ValueError(f"this model variant needs {name} of shape {shape}, got None")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
        return t

    def _cat_query(self, cat_emb: Mapping[str, Tensor]) -> Tensor:
        assert self.query_field is not None
        q = cat_emb[self.query_field.name]
        return self.query_proj(q) if self.query_proj is not None else q

    def _aggregate_images(
        self, hist: Tensor, mask: Tensor, ad: Tensor | None, cat_emb: Mapping[str, Tensor]
    ) -> list[Tensor]:
        agg = self.cfg.aggregator
        if agg == "sum":
            return [masked_sum(hist, mask)]
        if agg == "max":
            return [masked_max(hist, mask)]
        assert self.image_attention is not None
        if agg == "attentive":
            query = ad if self.uses_ad_image else self._cat_query(cat_emb)
            assert query is not None
            return [self.image_attention(query, hist, mask)]
        assert self.image_attention_cat is not None and ad is not None
        return [self.image_attention(ad, hist, mask), self.image_attention_cat(self._cat_query(cat_emb), hist, mask)]

    def extra_repr(self) -> str:
        return (f"features={self.cfg.features!r}, aggregator={self.cfg.aggregator!r}, "
                f"paired={[(s.name, a.name) for s, a in self.paired]}, mlp_in={self.mlp_in_dim}")


class _Columns(Mapping[str, Tensor]):
    """A field's (B, d) embedding by name, read from the packed (B, F, d) block only when asked for
    (the attention queries need two or three of the F fields)."""

    def __init__(self, block: Tensor, position: dict[str, int]):
        self.block, self.position = block, position

    def __getitem__(self, name: str) -> Tensor:
        return self.block[:, self.position[name]]

    def __iter__(self):
        return iter(self.position)

    def __len__(self) -> int:
        return len(self.position)
