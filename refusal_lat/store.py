"""Artifacts on disk: one stable hash, one atomic writer, one cache primitive, one version table.

A cached artifact is a file plus a JSON sidecar (same name, .json) holding the hash of the key that
determines it (with the torch and transformers versions), the sha256 of the file's bytes and its row
count. `store` removes the old sidecar before it writes the file and writes the new one last, so a
kill between the two leaves no sidecar; `fresh` accepts the file only while the key hash and the
content hash both match, so a stale, cut or edited file is recomputed, never read. Tensors also carry
the key hash in their safetensors metadata.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

VERSIONS = {  # bump a stage's tag when its code changes what it returns
    "activations": "activations-v1",
    "generation": "generation-v3",  # v2: per-row units share the prompt prefix; v3: rows keep the turn (end-of-turn cut)
    "selection": "selection-v1",
    "scores": "scores-v1",
    "harmless-kl": "harmless-kl-v1",
    "training": "training-v1",
    "labelling": "labelling-v1",  # labelset.attacked_artifacts: the labelling set's attacked and harmless rows
}


class StoreError(RuntimeError):
    """An artifact that cannot be written (disk full, not writable) or must not be (no or too few rows)."""


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


@lru_cache(maxsize=1)
def library_versions() -> dict:
    """Part of every cache key: another torch or transformers may compute other numbers."""
    from importlib.metadata import version
    import torch
    return {"torch": torch.__version__, "transformers": version("transformers")}


def key_hash(key: dict) -> str:
    return stable_hash({**key, "libraries": library_versions()})


STALE_SECONDS = 600  # a temp file this old belongs to a write that was killed (a write takes seconds)


def atomic_write(path: Path, payload: bytes):
    """Write to a temp file beside `path`, make it world-readable (0644) and rename: never torn. On any
    error the temp file is removed and a one-line StoreError names the folder. Temp files that a killed
    write left in the folder (older than STALE_SECONDS) are removed first."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob("*.tmp"):
            try:
                if stale.is_file() and time.time() - stale.stat().st_mtime > STALE_SECONDS:
                    stale.unlink()
            except FileNotFoundError:  # another process swept it first
                pass
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
            tmp = f.name
            f.write(payload)
        os.chmod(tmp, 0o644)  # NamedTemporaryFile creates 0600
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise StoreError(write_failure(path.parent, err)) from None


def write_failure(folder: Path, err: OSError) -> str:
    """The one-line message for a write that failed (disk full, read-only, not a folder)."""
    reason = err.strerror or type(err).__name__
    hint = ("free space on that disk (or pass another run_dir) and rerun" if err.errno in (errno.ENOSPC, errno.EDQUOT)
            else "make it a writable folder, free space on that disk or pass another run_dir, and rerun")
    return f"could not write in {folder} ({reason}); {hint}"


def count_rows(value):
    """Rows of an artifact: len of a list or table, first dimension of each tensor in a dict."""
    if isinstance(value, dict):
        return {k: int(v.shape[0]) for k, v in value.items()}
    return len(value)


def check_rows(path: Path, key: dict, rows):
    """No artifact with no rows, or with other row counts than its key says (key["rows"]), is saved."""
    counts = rows.values() if isinstance(rows, dict) else [rows]
    if rows is not None and (not counts or min(counts) == 0):
        raise StoreError(f"refusing to save {path}: it has no rows ({rows}); check batch_size and the prompt counts")
    if "rows" in key and rows != key["rows"]:
        raise StoreError(f"refusing to save {path}: {rows} rows where its key says {key['rows']}; "
                         f"the computation returned too few results")


def fresh(path: Path, key: dict, read):
    """read(path) when the file and its sidecar exist, the sidecar holds key_hash(key) and the file's
    sha256 matches the one the sidecar recorded; else None (missing, stale, cut, edited or corrupt:
    the caller recomputes rather than fails)."""
    path, meta = Path(path), Path(path).with_suffix(".json")
    if not (path.is_file() and meta.is_file()):
        return None
    try:
        sidecar = json.loads(meta.read_text())
        if sidecar.get("hash") != key_hash(key):
            return None
        if sidecar.get("sha256") != sha256_file(path):
            print(f"cache {path.name} differs from what was stored (cut or edited); recomputing", file=sys.stderr)
            return None
        return read(path)
    except Exception as err:
        print(f"cache {path.name} unreadable ({type(err).__name__}); recomputing", file=sys.stderr)
        return None


def store(path: Path, key: dict, payload: bytes, rows=None, **info):
    """Remove the old sidecar, write the artifact, then its sidecar {hash, sha256, rows, key, **info}."""
    path = Path(path)
    check_rows(path, key, rows)
    try:
        path.with_suffix(".json").unlink(missing_ok=True)
    except OSError as err:
        raise StoreError(write_failure(path.parent, err)) from None
    atomic_write(path, payload)
    sidecar = {"hash": key_hash(key), "sha256": hashlib.sha256(payload).hexdigest(), "rows": rows,
               "key": key, "libraries": library_versions(), **info}
    atomic_write(path.with_suffix(".json"), json.dumps(sidecar, indent=1, default=str).encode())


def cached(path: Path, key: dict, compute, read, encode):
    """The cache primitive: the fresh artifact at `path`, else compute(info), stored as
    encode(value, key_hash(key)) with the seconds it took and whatever compute noted in `info`. A file
    lock makes a second process wait for the first instead of computing the same thing twice."""
    from filelock import FileLock
    value = fresh(path, key, read)
    if value is not None:
        return value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(write_failure(path.parent, err)) from None
    with FileLock(str(path) + ".lock"):
        value = fresh(path, key, read)  # another process may have finished it meanwhile
        if value is None:
            started, info = time.time(), {}
            value = compute(info)
            store(path, key, encode(value, key_hash(key)), rows=count_rows(value),
                  seconds=round(time.time() - started, 1), **info)
    return value


def read_tensors(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(path)


def encode_tensors(tensors: dict, key: str | None = None) -> bytes:
    """safetensors bytes; `key` (a key hash) is kept in the file's metadata, so the file names its key."""
    from safetensors.torch import save
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=None if key is None else {"key": key})


def read_table(path: Path):
    import pandas as pd
    return pd.read_csv(path)


def encode_table(table, key: str | None = None) -> bytes:
    """Plain CSV (notebooks and readers consume it as is); its key and content hash are in the sidecar."""
    return table.to_csv(index=False).encode()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def encode_jsonl(rows: list[dict], key: str | None = None) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()
