"""Frontend settings programs read or set (`sgl.global_config`, as in SGLang)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class GlobalConfig:
    default_backend: Any = None  # what `run()` uses without `backend=` (`set_default_backend`)


global_config = GlobalConfig()
