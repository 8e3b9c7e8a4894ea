"""Models: load (hub + PEFT + NF4, tiny), gguf (PyPI wheels -> safetensors), pool (one resident model)."""
