"""Streaming: `run(stream=True)` returns at once; `text_iter()` yields the text as the model produces it.

    python examples/streaming.py                          # the embedded SmolLM2, in process
    python examples/streaming.py --url http://127.0.0.1:30000   # a running `radixflow serve`
"""

from __future__ import annotations

import argparse

import radixflow as sgl


@sgl.function
def story(s, subject):
    s += sgl.system("You are a storyteller.")
    s += sgl.user(f"Tell me a very short story about {subject}.")
    s += sgl.assistant(sgl.gen("story", max_tokens=96))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running radixflow (or SGLang) server; default: an in-process Engine")
    parser.add_argument("--subject", default="a lighthouse keeper")
    args = parser.parse_args()
    backend = sgl.RuntimeEndpoint(args.url) if args.url else sgl.Engine()

    # Only the generated variable's pieces (text_iter() with no name streams the whole prompt too).
    state = story.run(subject=args.subject, temperature=0.7, stream=True, backend=backend)
    for piece in state.text_iter("story"):
        print(piece, end="", flush=True)
    print(f"\n\n({state.get_meta_info('story')['completion_tokens']} tokens)")

    backend.shutdown()


if __name__ == "__main__":
    main()
