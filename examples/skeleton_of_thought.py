"""Skeleton of thought: write an outline, `fork` to expand every point in parallel, `join`, then summarize.

The fork sends the shared prefix to the runtime once; the branches then run as one batch, each reusing the
prefix's KV cache.

    python examples/skeleton_of_thought.py                          # the embedded SmolLM2, in process
    python examples/skeleton_of_thought.py --url http://127.0.0.1:30000   # a running `radixflow serve`
"""

from __future__ import annotations

import argparse
import time

import radixflow as sgl


@sgl.function
def skeleton_of_thought(s, topic, num_points=3):
    s += f"USER: Give some tips for {topic}.\nASSISTANT: Okay. Here are {num_points} concise tips:\n"
    for i in range(1, num_points + 1):
        s += f"{i}." + sgl.gen(f"point_{i}", max_tokens=12, stop=["\n", "."]) + ".\n"

    forks = s.fork(num_points)
    for i, branch in enumerate(forks):
        branch += f"Now, I expand tip {i + 1} into a detailed paragraph:\nTip {i + 1}:"
        branch += sgl.gen("detail", max_tokens=48, stop="\n\n")
    forks.join()  # the parent gets `detail` as a list, one entry per branch

    s += "Here are these tips with detailed explanation:\n"
    for i, detail in enumerate(s["detail"]):
        s += f"Tip {i + 1}:{detail}\n"
    s += "\nIn summary," + sgl.gen("summary", max_tokens=48, stop="\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running radixflow (or SGLang) server; default: an in-process Engine")
    parser.add_argument("--topic", default="staying healthy")
    args = parser.parse_args()
    backend = sgl.RuntimeEndpoint(args.url) if args.url else sgl.Engine()

    start = time.perf_counter()
    state = skeleton_of_thought.run(topic=args.topic, temperature=0, backend=backend)
    print(state.text())
    print(f"\n({time.perf_counter() - start:.1f}s; error: {state.error()})")

    backend.shutdown()


if __name__ == "__main__":
    main()
