"""Reproduction of "Latent Adversarial Training Improves the Representation of Refusal", as stage
modules that read top to bottom; docs/design.md describes the layout."""
from . import quiet as _quiet

_quiet.install()  # library noise filtered at the source (refusal_lat/quiet.py)
