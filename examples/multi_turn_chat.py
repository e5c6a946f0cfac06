"""A two-turn chat: role blocks use the model's own chat template; `messages()` gives the OpenAI-style history.

    python examples/multi_turn_chat.py                          # the embedded SmolLM2, in process
    python examples/multi_turn_chat.py --url http://127.0.0.1:30000   # a running `radixflow serve`
"""

from __future__ import annotations

import argparse

import radixflow as sgl


@sgl.function
def chat(s, question_1, question_2):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question_1)
    s += sgl.assistant(sgl.gen("answer_1", max_tokens=48))
    with s.user():  # the `with` form: everything appended inside is the user's turn
        s += question_2
    with s.assistant():
        s += sgl.gen("answer_2", max_tokens=48)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running radixflow (or SGLang) server; default: an in-process Engine")
    args = parser.parse_args()
    backend = sgl.RuntimeEndpoint(args.url) if args.url else sgl.Engine()

    state = chat.run(question_1="What is the capital of France?", question_2="And what is it famous for?",
                     temperature=0, backend=backend)
    for message in state.messages():
        print(f"{message['role']:>9}: {message['content']}")
    print("\nThe prompt the model saw:\n" + state.text())

    backend.shutdown()


if __name__ == "__main__":
    main()
