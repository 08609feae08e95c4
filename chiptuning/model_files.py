"""What ``--model`` names: a hub id, a local directory, or a GGUF file.

A GGUF file (llama.cpp's format) is converted once into a Hugging Face directory in the user's
cache (``CHIPTUNING_CACHE``, default ``~/.cache/chiptuning``), keyed by its sha256: transformers
would dequantize it on every load. Which files can be read is asked of transformers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from chiptuning.errors import ChipTuningError, UnsupportedModelError, first_line
from chiptuning.io import sha256_file, write_json_atomic
from chiptuning.outputs import clean_stale, finish_dir, normal_permissions, read_record_json, sibling_dir
from chiptuning.records import Invalid, Record
from chiptuning.registry import get_spec

log = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
SOURCE_FILE = "chiptuning-source.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class GGUFSource(Record):
    """A GGUF file as provenance records it (no local path), and ``chiptuning-source.json`` of its
    converted directory: its name, sha256, ``general.architecture`` (llama.cpp's name) and
    quantization (its file type, e.g. ``MOSTLY_Q4_1``, and the tensor types it holds)."""

    file: str
    sha256: str
    architecture: str
    quantization: str
    format: Literal["gguf"] = "gguf"

    def check(self) -> None:
        if not _SHA256.fullmatch(self.sha256):
            raise Invalid("sha256", "is not a sha256 (64 hex digits)")

    @property
    def path(self) -> Path:
        """The converted Hugging Face directory (in the user's cache, named by the file's hash)."""
        return cache_dir() / "gguf" / self.sha256[:16]


def cache_dir() -> Path:
    """The user's chip-tuning cache directory."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("CHIPTUNING_CACHE") or Path(base) / "chiptuning")


def is_gguf(model_name_or_path: str | Path) -> bool:
    """True when ``--model`` names a GGUF file."""
    return str(model_name_or_path).lower().endswith(GGUF_SUFFIX)


def _remembered_sha256(path: Path) -> str:
    """sha256 of a (large) file, remembered by path, size and modification time."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = cache_dir() / "gguf" / "hashes.json"
    index = read_record_json(index_path)
    if not isinstance(index, dict) or not all(isinstance(v, str) for v in index.values()):
        index = {}  # missing or damaged: it is only a cache of hashes
    if not _SHA256.fullmatch(str(index.get(key, ""))):
        index[key] = sha256_file(path)
        index_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(index_path, index)
    return index[key]


def _read_gguf_metadata(path: Path) -> tuple[str, str]:
    """(architecture, quantization) from a GGUF file's metadata (no tensor is read)."""
    try:
        # gguf is the optional reader of this format (the `gguf` extra): imported when a GGUF file is given.
        import gguf
    except ImportError:
        raise ChipTuningError("GGUF models need the gguf and accelerate packages: "
                              "pip install 'chip-tuning[gguf]'") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as err:
        raise ChipTuningError(f"{path} is not a readable GGUF file ({first_line(err)})") from None
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        raise ChipTuningError(f"{path} has no general.architecture in its metadata; not a model GGUF file")
    architecture = str(arch_field.contents())
    file_type = reader.fields.get("general.file_type")
    kinds = sorted({t.tensor_type.name for t in reader.tensors})
    name = "unknown"
    if file_type is not None:
        try:
            name = gguf.LlamaFileType(int(file_type.contents())).name
        except ValueError:
            name = f"file_type {file_type.contents()}"
    return architecture, f"{name} (tensors: {', '.join(kinds)})"


def _model_type(path: Path, architecture: str) -> str:
    """The transformers model type a GGUF file becomes (from its metadata); UnsupportedModelError
    naming the llama.cpp architecture when transformers cannot read it or the registry lacks it."""
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, TypeError) as err:
        # KeyError: an architecture transformers knows, from a file lacking a metadata key it needs.
        detail = f"its metadata lacks {err}" if isinstance(err, KeyError) else first_line(err)
        raise UnsupportedModelError(f"{path.name}: transformers {transformers.__version__} cannot read GGUF "
                                    f"architecture {architecture!r} ({detail})") from None
    try:
        get_spec(config)
    except UnsupportedModelError:
        raise UnsupportedModelError(
            f"{path.name}: GGUF architecture {architecture!r} (transformers model type {config.model_type!r}) "
            "is not in the chip-tuning architecture registry; add an ArchSpec to chiptuning/registry.py"
        ) from None
    return config.model_type


def resolve_gguf(path: str | Path) -> GGUFSource:
    """The record of a GGUF file, whose ``path`` is its converted directory (converted on first use)."""
    path = Path(path)
    if not path.is_file():
        raise ChipTuningError(f"--model {path}: no such GGUF file")
    digest = _remembered_sha256(path)
    target = cache_dir() / "gguf" / digest[:16]
    record_path = target / SOURCE_FILE
    if record_path.is_file():
        record = GGUFSource.read(record_path)
        if record.sha256 != digest:
            raise ChipTuningError(f"{record_path} records another file (sha256 {record.sha256[:16]}...); the "
                                  f"conversion cache is damaged: remove {target} and run again")
        return dataclasses.replace(record, file=path.name)
    architecture, quantization = _read_gguf_metadata(path)
    model_type = _model_type(path, architecture)
    log.info("converting %s (%s, model type %s, %s) to a Hugging Face directory in %s (once per file)",
             path.name, architecture, model_type, quantization, target)
    source = GGUFSource(file=path.name, sha256=digest, architecture=architecture, quantization=quantization)
    _convert(path, target, source)
    return source


def _dequantized(path: Path):
    """The model and tokenizer of a GGUF file, its weights dequantized to float32 and savable."""
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # A transformers with GgufConfig may keep quantized blocks packed (GgufLinear); the saved
        # directory needs plain tensors.
        unpacked = ({"quantization_config": transformers.GgufConfig(dequantize=True)}
                    if hasattr(transformers, "GgufConfig") else {})
        # transformers draws its own tqdm bar while dequantizing: kept on a terminal, kept out of a log
        with contextlib.redirect_stderr(sys.stderr if sys.stderr.isatty() else io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **unpacked)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UnsupportedModelError(f"{name}: transformers cannot load this GGUF file ({first_line(err)})") from None
    model.hf_quantizer = None  # the weights are plain tensors; the GGUF quantizer only blocks save_pretrained
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    return model, tokenizer


def _convert(path: Path, target: Path, record: GGUFSource) -> None:
    """Save the dequantized GGUF file ``path`` as a Hugging Face directory at ``target``."""
    hf_logging.disable_progress_bar()
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)  # a conversion killed part-way
    tmp = sibling_dir(target)
    try:
        model, tokenizer = _dequantized(path)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        AutoConfig.from_pretrained(tmp)  # it must load as a plain directory
        record.write(tmp / SOURCE_FILE)
        if target.exists():  # a concurrent conversion of the same file finished first
            shutil.rmtree(tmp)
            return
        normal_permissions(tmp)
        finish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def looks_local(model_name_or_path: str | Path) -> bool:
    """Whether ``--model`` can only mean a local path: absolute, ``./``, ``../`` or ``~``, or more
    than one ``/`` (a hub id is ``name`` or ``owner/name``)."""
    text = str(model_name_or_path)
    return isinstance(model_name_or_path, Path) or text.startswith(("/", ".", "~")) or text.count("/") > 1 \
        or "\\" in text


def resolve_model_path(model_name_or_path: str | Path) -> str:
    """What transformers should load for ``--model``: a GGUF file's converted directory, else the
    name or path as given (``~`` expanded); ChipTuningError for a local path that does not exist."""
    if is_gguf(model_name_or_path):
        return str(resolve_gguf(model_name_or_path).path)
    if looks_local(model_name_or_path) and not Path(model_name_or_path).expanduser().exists():
        raise ChipTuningError(f"model {model_name_or_path}: no such directory (a local path; a hub id is NAME or "
                              "OWNER/NAME)")
    return str(Path(model_name_or_path).expanduser()) if str(model_name_or_path).startswith("~") \
        else str(model_name_or_path)


__all__ = ["GGUFSource", "cache_dir", "is_gguf", "looks_local", "resolve_gguf", "resolve_model_path"]
