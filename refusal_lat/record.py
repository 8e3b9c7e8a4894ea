"""Committed results: a sha256 manifest per committed folder, checked whenever the folder is read, and
the one rule for writing into such a folder.

A committed folder (an adapter of adapters/<profile>/..., the tables in adapters/<profile>/.../eval/,
figures/<profile>/, notebooks/reference/<profile>/) holds MANIFEST: the sha256 of every other file in
it, the command that re-creates the folder, and the sha256 of those two entries, so a cut or edited
manifest is caught as well. `verify` raises a one-line CommittedError on the first file that differs,
is missing or is not listed. Nothing writes into a committed folder (one that holds a MANIFEST, or
anything under adapters/ or notebooks/reference/) unless the command is the one that publishes it and
was given --publish (`check_writable`); that command then calls `seal` again.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import REPO, ConfigError
from .store import atomic_write, sha256_file, stable_hash

MANIFEST = "MANIFEST.json"
COMMITTED_ROOTS = ("adapters", "notebooks/reference")  # everything below them is committed


class CommittedError(ConfigError):
    """A committed file that differs from its manifest, or a write into a committed folder."""


def shown(path: Path) -> str:
    """The path relative to the repository when it lies inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def changed(path: Path, remake: str | None) -> str:
    how = f"re-create it with `{remake}`" if remake else "re-create its folder with the command that published it"
    return f"{shown(path)} changed since it was committed; `git checkout` it or {how}"


def _files(folder: Path) -> list[Path]:
    return sorted(f for f in Path(folder).iterdir() if f.is_file() and f.name != MANIFEST)


def seal(folder: Path, remake: str) -> Path:
    """Write folder/MANIFEST for the files now in `folder` (not its sub-folders); `remake` is the
    command that re-creates them."""
    folder = Path(folder)
    body = {"remake": remake, "files": {f.name: sha256_file(f) for f in _files(folder)}}
    atomic_write(folder / MANIFEST, (json.dumps({**body, "sha256": stable_hash(body)}, indent=1) + "\n").encode())
    return folder / MANIFEST


def sealed(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def verify(folder: Path):
    """Nothing when `folder` holds no MANIFEST (it is not committed) or every file in it has the sha256
    the manifest records, none missing and none added; else a one-line CommittedError naming the file."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return
    try:
        record = json.loads(manifest.read_text())
        body = {"remake": record["remake"], "files": record["files"]}
        intact = isinstance(body["files"], dict) and record["sha256"] == stable_hash(body)
    except (ValueError, KeyError, TypeError):
        intact = False
    if not intact:
        raise CommittedError(changed(manifest, None))
    listed, remake = body["files"], body["remake"]
    for f in _files(folder):
        if f.name not in listed:
            raise CommittedError(f"{shown(f)} is not part of the committed folder {shown(folder)}; remove it, "
                                 f"or re-create the folder with `{remake}`")
    for name, digest in listed.items():
        if not (folder / name).is_file() or sha256_file(folder / name) != digest:
            raise CommittedError(changed(folder / name, remake))


def committed(folder: Path) -> bool:
    """A folder that holds a MANIFEST or lies under one of COMMITTED_ROOTS of this repository."""
    folder = Path(folder).resolve()
    return sealed(folder) or any(folder.is_relative_to(REPO / root) for root in COMMITTED_ROOTS)


def check_writable(folder: Path, publish: bool, command: str = "the command that publishes it"):
    """A CommittedError unless `folder` is not committed or the caller publishes (--publish)."""
    if committed(folder) and not publish:
        raise CommittedError(f"{shown(folder)} holds committed results; write elsewhere (another --out or run_dir), "
                             f"or replace them on purpose with {command} --publish")


def remake_command(folder: Path) -> str:
    """The command that re-creates a committed folder, from where it lies: an adapter
    (adapters/<profile>/.../<arm>-s<seed>), its evaluation tables (.../eval), figures/<profile>,
    notebooks/reference/<profile>."""
    parts = Path(shown(folder)).parts
    if parts[:1] == ("adapters",) and len(parts) > 2:
        arm, _, seed = parts[-1].rpartition("-s")
        budget = parts[-2][3:] if len(parts) > 3 and parts[-2].startswith("eps") else None  # a sweep point
        if parts[-1] == "eval" and any(f.name.startswith("eps") for f in Path(folder).parent.glob("eps*")):
            try:  # tables of the activations only or without the attacks (evaluate_sweep(generate, attacks)) say so
                manifest = json.loads((Path(folder) / "manifest.json").read_text())
            except (OSError, ValueError):
                manifest = {}
            flag = (" --activations-only" if manifest.get("generated") is False else
                    " --no-attacks" if manifest.get("attacks") is False else "")
            return f".venv/bin/python scripts/evaluate_sweep.py --profile {parts[1]} --threads 1{flag} --publish"
        if parts[-1] == "eval":
            return f".venv/bin/python scripts/evaluate_arms.py --profile {parts[1]} --publish"
        if arm and seed.isdigit() and budget is not None:
            return (f".venv/bin/python scripts/train_adapters.py --profile {parts[1]} --budget {budget} --arms {arm} "
                    f"--seeds {seed} --publish")
        if arm and seed.isdigit():
            return (f".venv/bin/python scripts/train_adapters.py --profile {parts[1]} --arms {arm} --seeds {seed} "
                    f"--publish")
    if parts[:1] == ("figures",) and len(parts) == 2:
        return f".venv/bin/python scripts/run_notebooks.py --profile {parts[1]} --publish"
    if parts[:2] == ("notebooks", "reference") and len(parts) == 3:
        return f".venv/bin/python scripts/publish_reference.py --profile {parts[2]} --publish"
    raise CommittedError(f"{shown(folder)} is not a folder this repository publishes (an adapter, its eval tables, "
                         f"figures/<profile> or notebooks/reference/<profile>)")


def publish_run(out: Path, publish: bool, work, threads: int | None = None) -> int:
    """The tail every evaluation script shares: torch's CPU threads set (threads >= 1), work() run, `out` sealed
    again when it is a committed folder written with --publish, the time printed. A ConfigError (a committed
    folder in the way, a bad option) prints one line and returns 2; what work() stored before it stays."""
    import sys
    import time

    import torch
    started = time.time()
    try:
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"threads = {threads} is out of range; need threads >= 1")
            torch.set_num_threads(threads)
        work()
        if publish and committed(out):
            seal(out, remake_command(out))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"evaluated in {(time.time() - started) / 60:.1f} min on {torch.get_num_threads()} threads -> {out}")
    return 0
