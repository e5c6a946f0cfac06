"""Every inter-process message survives the serializer unchanged."""

from radixflow.runtime.request import FinishReason, LogprobOptions, Req, TokenLogprobs
from radixflow.runtime.sampling_params import SamplingParams
from radixflow.runtime.scheduler.output import RequestOutput
from radixflow.server.messages import (
    AbortRequest,
    AddRequest,
    ControlReply,
    ControlRequest,
    OutputBatch,
    Ready,
    dumps,
    loads,
)


def test_round_trip_of_every_message():
    req = Req(rid="r1", prompt_ids=(1, 2, 3), params=SamplingParams(max_new_tokens=5, stop=["x"], seed=3),
              logprob_options=LogprobOptions(True, 0, 2), stop_ids=frozenset({2}))
    out = RequestOutput(rid="r1", token_ids=[4], text="hi", finished=True, finish_reason=FinishReason("stop", "x"),
                        prompt_tokens=3, completion_tokens=1, cached_tokens=2,
                        output_logprobs=[TokenLogprobs(-0.5, ((4, -0.5), (5, -1.0)))])
    messages = [AbortRequest("r1"), ControlRequest(7, "stats"), ControlReply(7, {"a": 1}), ControlReply(8, error="x"),
                Ready(100, 200, 300), Ready(0, 0, 0, error="boom"), OutputBatch([out, out])]
    for message in messages:
        assert loads(dumps(message)) == message
    add = loads(dumps(AddRequest(req)))
    for field in ("rid", "prompt_ids", "params", "logprob_options", "stop_ids", "arrival", "status"):
        assert getattr(add.req, field) == getattr(req, field)
