"""The model's view of a processed dataset's fields, read from `manifest.json` (see docs/DATA.md).

A `FeatureMap` lists the fields the trainer feeds the model and the vocabularies behind them.
Fields that name the same vocabulary (`item_id` and `hist_item_id`) share one embedding table, so
`vocabs` maps each vocabulary name to its size once. Image fields (`ad_image`, `hist_image`) carry
rows of the image store, not vocabulary indices; their embeddings come from the image service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vitrine.errors import UserError

KINDS = ("categorical", "sequence", "image", "image_sequence")
ID_KINDS = ("categorical", "sequence")
SEQUENCE_KINDS = ("sequence", "image_sequence")


@dataclass(frozen=True)
class Field:
    """One manifest field. `vocab`/`vocab_size` only for ID kinds; `max_len` only for sequences."""

    name: str
    kind: str  # categorical | sequence | image | image_sequence
    vocab: str | None = None
    vocab_size: int = 0
    group: str = ""
    max_len: int = 0

    @property
    def is_id(self) -> bool:
        return self.kind in ID_KINDS

    @property
    def is_sequence(self) -> bool:
        return self.kind in SEQUENCE_KINDS


class FeatureMap:
    """The fields of a dataset, grouped the way the model needs them.

    Attributes: `fields` (manifest order), `categorical` (kind categorical), `sequences` (kind
    sequence: behaviour ID lists), `images` (kinds image and image_sequence), `has_images`,
    `max_len` (L, the longest sequence field; 0 without sequences) and `vocabs` (vocabulary name ->
    size, in order of first appearance).
    """

    def __init__(self, fields: list[Field]):
        if not fields:
            raise UserError("the feature map has no fields")
        names = [f.name for f in fields]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"duplicate field names in the manifest: {dup}")
        vocabs: dict[str, int] = {}
        lens: set[int] = set()
        for f in fields:
            if f.kind not in KINDS:
                raise UserError(f"field {f.name!r} has unknown kind {f.kind!r}; expected one of {list(KINDS)}")
            if f.is_id:
                if not f.vocab:
                    raise UserError(f"field {f.name!r} ({f.kind}) names no vocabulary")
                if f.vocab_size < 2:
                    raise UserError(
                        f"field {f.name!r} has vocab_size {f.vocab_size}; at least 2 (padding + out-of-vocabulary)"
                    )
                if f.vocab in vocabs and vocabs[f.vocab] != f.vocab_size:
                    raise UserError(
                        f"fields sharing vocabulary {f.vocab!r} disagree on its size "
                        f"({vocabs[f.vocab]} vs {f.vocab_size} for {f.name!r})"
                    )
                vocabs[f.vocab] = f.vocab_size
            if f.is_sequence:
                if f.max_len < 1:
                    raise UserError(f"sequence field {f.name!r} has max_len {f.max_len}; expected >= 1")
                lens.add(f.max_len)
        if len(lens) > 1:
            raise UserError(f"sequence fields disagree on max_len: {sorted(lens)}; the loader pads them to one L")
        self.fields: list[Field] = list(fields)
        self.categorical: list[Field] = [f for f in fields if f.kind == "categorical"]
        self.sequences: list[Field] = [f for f in fields if f.kind == "sequence"]
        self.images: list[Field] = [f for f in fields if f.kind in ("image", "image_sequence")]
        self.has_images: bool = bool(self.images)
        self.max_len: int = max(lens) if lens else 0
        self.vocabs: dict[str, int] = vocabs

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "FeatureMap":
        """Build from a parsed `manifest.json` (its `fields` list)."""
        raw = manifest.get("fields") if isinstance(manifest, dict) else None
        if not isinstance(raw, list):
            raise UserError("manifest has no 'fields' list; is this a processed dataset (vitrine pipeline)?")
        fields = []
        for i, d in enumerate(raw):
            if not isinstance(d, dict) or "name" not in d or "kind" not in d:
                raise UserError(f"manifest field #{i} lacks 'name' or 'kind': {d!r}")
            try:
                fields.append(Field(
                    name=str(d["name"]),
                    kind=str(d["kind"]),
                    vocab=None if d.get("vocab") is None else str(d["vocab"]),
                    vocab_size=int(d.get("vocab_size", 0) or 0),
                    group=str(d.get("group", "")),
                    max_len=int(d.get("max_len", 0) or 0),
                ))
            except (TypeError, ValueError) as e:
                raise UserError(f"manifest field #{i} ({d.get('name')!r}) has a bad value: {e}") from e
        return cls(fields)

    # -- lookups -----------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return any(f.name == name for f in self.fields)

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)

    def ad_field_for(self, seq: Field) -> Field | None:
        """The categorical field a behaviour sequence mirrors (same vocabulary), preferring the ad group.

        `hist_item_id` -> `item_id`; None when no categorical field shares the vocabulary.
        """
        same = [f for f in self.categorical if f.vocab == seq.vocab]
        ad = [f for f in same if f.group == "ad"]
        return (ad or same or [None])[0]

    def __repr__(self) -> str:
        return (f"FeatureMap({len(self.categorical)} categorical, {len(self.sequences)} sequence, "
                f"images={self.has_images}, L={self.max_len}, vocabs={self.vocabs})")
