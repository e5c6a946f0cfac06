"""`python -m radixflow.serve [flags]`: the same as `radixflow serve`."""

from radixflow.cli import main

if __name__ == "__main__":
    import sys

    main(["serve", *sys.argv[1:]])
