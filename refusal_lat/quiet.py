"""Library noise, filtered once where the engine is imported (refusal_lat/__init__.py), not per notebook.
Each filter names the message and why it is safe to hide; anything else still shows."""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager


def install():
    # bitsandbytes on CPUs with AVX512-BF16 logs "Failed to load CPU gemm_4bit_forward from kernels-community:
    # No module named 'kernels'" at import: an optional faster NF4 kernel; its own fallback is what runs.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # transformers 5 deprecates `is_gradient_checkpointing`; peft still reads it when an adapter is loaded
    # (a FutureWarning carrying this machine's site-packages path).
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


@contextmanager
def no_loading_bars():
    """transformers' "Loading weights" bar (a frozen widget in a saved notebook, hundreds of lines in a log)
    off while the block runs; every other bar (downloads) and the previous tqdm hook stay as they were."""
    from transformers.utils import logging as hf_logging

    def hook(factory, args, kwargs):
        if str(kwargs.get("desc", "")).startswith("Loading weights"):
            kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous else factory(*args, **kwargs)

    previous = hf_logging.set_tqdm_hook(hook)
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous)
