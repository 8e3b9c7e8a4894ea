"""Artifacts on disk: one stable hash, one atomic writer, one cache primitive, one version table.

A cached artifact is a file plus a JSON sidecar (same name, .json) holding the hash of the key that
determines it. `cached` reuses the file while the hash matches and recomputes it otherwise.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

VERSIONS = {  # bump a stage's tag when its code changes what it returns
    "activations": "activations-v1",
    "generation": "generation-v3",  # v2: per-row units share the prompt prefix; v3: rows keep the turn (end-of-turn cut)
    "selection": "selection-v1",
    "harmless-kl": "harmless-kl-v1",
    "training": "training-v1",
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tensor_hash(tensor) -> str:
    """sha256 of a tensor's float32 bytes (directions in cache keys)."""
    return hashlib.sha256(tensor.float().contiguous().numpy().tobytes()).hexdigest()


def atomic_write(path: Path, payload: bytes):
    """Write to a temp file beside `path`, make it world-readable (0644) and rename: never torn."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
        f.write(payload)
    os.chmod(f.name, 0o644)  # NamedTemporaryFile creates 0600
    os.replace(f.name, path)


def fresh(path: Path, key: dict, read):
    """read(path) when the file and its sidecar exist and the sidecar holds stable_hash(key); else None
    (missing, stale, truncated or corrupt: the caller recomputes rather than fails)."""
    meta = path.with_suffix(".json")
    if not (path.is_file() and meta.is_file()):
        return None
    try:
        if json.loads(meta.read_text()).get("hash") != stable_hash(key):
            return None
        return read(path)
    except Exception as err:
        print(f"cache {path.name} unreadable ({type(err).__name__}); recomputing", file=sys.stderr)
        return None


def store(path: Path, key: dict, payload: bytes, **info):
    """Write the artifact, then its sidecar {hash, key, **info}."""
    atomic_write(path, payload)
    atomic_write(path.with_suffix(".json"), json.dumps({"hash": stable_hash(key), "key": key, **info},
                                                       indent=1, default=str).encode())


def cached(path: Path, key: dict, compute, read, encode):
    """The cache primitive: the fresh artifact at `path`, else compute(info), stored as encode(value)
    with the seconds it took and whatever compute noted in `info`. A file lock makes a second process
    wait for the first instead of computing the same thing twice."""
    from filelock import FileLock
    value = fresh(path, key, read)
    if value is not None:
        return value
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        value = fresh(path, key, read)  # another process may have finished it meanwhile
        if value is None:
            started, info = time.time(), {}
            value = compute(info)
            store(path, key, encode(value), seconds=round(time.time() - started, 1), **info)
    return value


def read_tensors(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(path)


def encode_tensors(tensors: dict) -> bytes:
    from safetensors.torch import save
    return save({k: v.contiguous() for k, v in tensors.items()})


def read_table(path: Path):
    import pandas as pd
    return pd.read_csv(path)


def encode_table(table) -> bytes:
    return table.to_csv(index=False).encode()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def encode_jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()
