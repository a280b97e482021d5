"""Reading the trainer's JSONL run log (one JSON object per line)."""

from __future__ import annotations

import json
from typing import Any


def read_jsonl(path: str) -> tuple[list[dict[str, Any]], int]:
    """Returns ``(records, skipped)``: the JSON objects of the file, and how many lines were
    not objects (e.g. the half-written last line of a job still running)."""
    records, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                skipped += 1
    return records, skipped
