"""Vitrine: end-to-end CTR prediction with images.

This package holds only what every part shares: the `vitrine` command dispatcher, typed-config
helpers, paths and the MLflow tracking helper. The parts themselves live in the top-level packages
`pipeline`, `image_service`, `trainer` and `app`.
"""

__version__ = "0.1.0"
