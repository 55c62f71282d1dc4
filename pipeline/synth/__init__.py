"""The synthetic world generator behind `vitrine generate`: users, items with drawn images, and
impression logs whose clicks depend on the pixels (see docs/DATA.md, "What `vitrine generate`
writes")."""

from pipeline.synth.world import WorldConfig, generate

__all__ = ["WorldConfig", "generate"]
