"""Reproduction of "Latent Adversarial Training Improves the Representation of Refusal", as stage
modules that read top to bottom; docs/design.md describes the layout."""
