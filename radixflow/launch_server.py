"""`python -m radixflow.launch_server [flags]`: the same as `radixflow serve` (SGLang's `python -m
sglang.launch_server` spelling)."""

import sys

from radixflow.cli import main

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
