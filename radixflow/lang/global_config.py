"""Frontend settings programs read or set (`sgl.global_config`, with SGLang's field names)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class GlobalConfig:
    # 0: print nothing; 2: print each program's final text after its run.
    verbosity: int = 0
    # What `run()` uses without `backend=` (`set_default_backend`).
    default_backend: Any = None
    # Before a `run_batch` of more than one program, trace the program and send its argument-independent prefix
    # to the backend once, so every program finds it cached.
    enable_precache_with_tracing: bool = True
    # On a radixflow runtime (an Engine or a server), each program state's gen calls carry a session id, so the
    # cache retains the state's KV while the program runs (it is evicted last), and the session is closed when
    # the state ends (radixflow's setting; docs/hicache.md).
    enable_program_sessions: bool = True
    # False: generated text keeps special tokens (every gen's `skip_special_tokens` default).
    skip_special_tokens_in_output: bool = True
    # Kept so SGLang programs that set them keep working; radixflow has no switch behind them (docs/api.md):
    # its detokenizer has no spacing option, and `join("concate_and_append")` always appends the children's
    # text, which the radix cache then shares, never their KV directly.
    spaces_between_special_tokens_in_out: bool = True
    enable_parallel_encoding: bool = True


global_config = GlobalConfig()
