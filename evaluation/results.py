"""Writing results: lm-eval's results dict as JSON (atomically), and the example count for throughput figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def count_examples(results: dict[str, Any]) -> int:
    """Documents scored over all tasks (lm-eval's ``n-samples`` ``effective`` counts)."""
    return sum(int(v.get("effective", 0)) for v in results.get("n-samples", {}).values())


def write_json(path: Path, payload: dict[str, Any]) -> None:
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    tmp.replace(path)
