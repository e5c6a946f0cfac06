"""Few-shot questions and answers, then `select` picks among fixed choices by their likelihood.

    python examples/few_shot_select.py                          # the embedded SmolLM2, in process
    python examples/few_shot_select.py --url http://127.0.0.1:30000   # a running `radixflow serve`
"""

from __future__ import annotations

import argparse

import radixflow as sgl

EXAMPLES = ("Q: What is the capital of Germany?\nA: Berlin\n"
            "Q: What is the capital of Italy?\nA: Rome\n"
            "Q: What is the capital of Canada?\nA: Ottawa\n")


@sgl.function
def capital(s, country):
    s += EXAMPLES
    s += f"Q: What is the capital of {country}?\nA:" + sgl.gen("answer", max_tokens=8, stop="\n")


@sgl.function
def pick_capital(s, country, choices):
    s += EXAMPLES
    s += f"Q: What is the capital of {country}?\nA: " + sgl.select("answer", choices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running radixflow (or SGLang) server; default: an in-process Engine")
    args = parser.parse_args()
    backend = sgl.RuntimeEndpoint(args.url) if args.url else sgl.Engine()
    sgl.set_default_backend(backend)

    # run_batch runs the programs concurrently; the shared few-shot prefix is computed once (radix cache).
    countries = ["Japan", "Spain", "the United Kingdom"]
    states = capital.run_batch([{"country": c} for c in countries], temperature=0)
    for country, state in zip(countries, states):
        print(f"gen     {country:20s} ->{state['answer']}")

    state = pick_capital.run(country="France", choices=["Paris", "London", "Berlin"])
    scores = state.get_meta_info("answer")["normalized_prompt_logprobs"]
    print(f"select  France               -> {state['answer']}  (mean logprobs {[round(x, 2) for x in scores]})")

    backend.shutdown()


if __name__ == "__main__":
    main()
