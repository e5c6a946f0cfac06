"""Command-line tools that are not the server: `python -m radixflow.tools.train_ranker`."""
