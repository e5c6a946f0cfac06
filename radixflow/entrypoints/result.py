"""A request's output deltas accumulated into SGLang's result shape: {"text", "output_ids", "meta_info"}."""

from __future__ import annotations

import time

from radixflow.runtime.request import Req
from radixflow.runtime.scheduler.output import RequestOutput


class ResultCollector:
    """Accumulates a request's deltas into SGLang's result shape. Logprob entries are `(logprob, token_id,
    token_text)`; the text is filled when the request asked for `return_text_in_logprobs` (decoded with
    `tokenizer`), else None."""

    def __init__(self, req: Req, tokenizer=None):
        self.req = req
        options = req.logprob_options
        self._token_text = ((lambda t: tokenizer.decode([t])) if options.return_text_in_logprobs and tokenizer
                            else (lambda t: None))
        self.start = time.monotonic()
        self.text = ""
        self.ids: list[int] = []
        self.out_lps: list = []
        self.prompt_lps: list = []
        self.last: RequestOutput | None = None
        self.finished = False

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.ids.extend(out.token_ids)
        self.out_lps.extend(out.output_logprobs)
        self.prompt_lps.extend(out.prompt_logprobs)
        self.last = out
        self.finished = out.finished

    def meta(self) -> dict:
        out = self.last
        meta = {
            "id": self.req.rid,
            "prompt_tokens": len(self.req.prompt_ids),
            "completion_tokens": len(self.ids),
            "cached_tokens": out.cached_tokens if out else 0,
            "finish_reason": out.finish_reason.to_dict() if out and out.finish_reason else None,
            "e2e_latency": time.monotonic() - self.start,
        }
        if self.req.logprob_options.return_logprob:
            meta["output_token_logprobs"] = [(lp.logprob, t, self._token_text(t))
                                             for lp, t in zip(self.out_lps, self.ids)]
            meta["output_top_logprobs"] = [[(v, i, self._token_text(i)) for i, v in lp.top] for lp in self.out_lps]
            start = self.req.logprob_options.logprob_start_len
            if start >= 0:
                prompt_lps = ([None] if start == 0 else []) + self.prompt_lps  # position 0 has no logprob
                prompt = self.req.prompt_ids[start:]
                meta["input_token_logprobs"] = [(lp.logprob if lp else None, t, self._token_text(t))
                                                for lp, t in zip(prompt_lps, prompt)]
                meta["input_top_logprobs"] = [[(v, i, self._token_text(i)) for i, v in lp.top] if lp else None
                                               for lp in prompt_lps]
        return meta

    def result(self) -> dict:
        return {"text": self.text, "output_ids": list(self.ids), "meta_info": self.meta()}

    def delta(self, out: RequestOutput) -> dict:
        return {"text": out.text, "output_ids": list(out.token_ids), "finished": out.finished, "meta_info": self.meta()}
