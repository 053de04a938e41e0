"""BLEU-4 and ROUGE-1/2/L on Chinese text, as the official ChatGLM2-6B P-tuning scripts score them.

Reproduces `compute_metrics` in THUDM/ChatGLM2-6B `ptuning/main.py` with the same libraries:
per (prediction, reference) pair, ROUGE-1/2/L F-scores from `rouge_chinese.Rouge` on jieba words
joined by spaces, and BLEU-4 from nltk's `sentence_bleu` on characters with smoothing method 3;
each score x100 and rounded to 4 decimals, then the mean over pairs.

Differences from the official code, on purpose:
- an empty or whitespace-only prediction or reference scores 0 on every metric and is counted
  (rouge_chinese raises "Hypothesis is empty." there, which crashed the official run);
- jieba is initialised once, quietly, and large inputs are scored in a process pool.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from glmtune.errors import GlmtuneError
from glmtune.fsutil import atomic_write_text, json_line, text_lines

logger = logging.getLogger(__name__)

METRIC_KEYS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")

# Below this many pairs per worker, starting processes costs more than it saves (a pair takes ~2 ms,
# a worker ~0.5-1 s to import nltk and load jieba's dictionary).
MIN_PAIRS_PER_WORKER = 64

_JIEBA_READY = False


def _init_jieba() -> None:
    """Load jieba's dictionary once per process, without its "Building prefix dict..." chatter."""
    global _JIEBA_READY
    if _JIEBA_READY:
        return
    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    _JIEBA_READY = True


def is_blank(text: str) -> bool:
    return not text or not text.strip()


def score_pair(predict: str, label: str) -> dict[str, float]:
    """Official per-pair scores (x100, rounded to 4 places); 0 for all when either side is blank."""
    if is_blank(predict) or is_blank(label):
        return {key: 0.0 for key in METRIC_KEYS}
    _init_jieba()
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    rouge = Rouge().get_scores(" ".join(jieba.cut(predict)), " ".join(jieba.cut(label)))[0]
    bleu = sentence_bleu([list(label)], list(predict), smoothing_function=SmoothingFunction().method3)
    scores = {"bleu-4": round(bleu * 100, 4)}
    for key in ("rouge-1", "rouge-2", "rouge-l"):
        scores[key] = round(rouge[key]["f"] * 100, 4)
    return scores


def _score_chunk(pairs: list[tuple[str, str]]) -> list[dict[str, float]]:
    return [score_pair(p, l) for p, l in pairs]


@dataclass
class MetricsResult:
    """Mean scores (official key names without prefix), per-pair scores, and how many pairs were blank."""

    mean: dict[str, float]
    per_pair: list[dict[str, float]] = field(default_factory=list)
    empty: int = 0

    @property
    def samples(self) -> int:
        return len(self.per_pair)

    def to_json(self, prefix: str = "predict") -> dict[str, float | int]:
        """The official `predict_results.json` keys (`predict_bleu-4`, ...) plus sample/empty counts."""
        out: dict[str, float | int] = {f"{prefix}_{key}": self.mean[key] for key in METRIC_KEYS}
        out[f"{prefix}_samples"] = self.samples
        out["empty_predictions"] = self.empty
        return out


def _pool_context() -> multiprocessing.context.BaseContext:
    # Workers only run pure-Python scoring, but the caller may hold torch/tokenizer threads, so a plain
    # fork() of it is unsafe; forkserver forks from a clean helper process with this module preloaded.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


def compute_metrics(predictions: Sequence[str], labels: Sequence[str], num_workers: int = 1) -> MetricsResult:
    """Score every pair and average; parallel over `num_workers` processes when the input is large enough.

    The numbers do not depend on `num_workers`: each pair is scored independently and results keep input order.
    """
    if len(predictions) != len(labels):
        raise GlmtuneError(f"{len(predictions)} predictions but {len(labels)} labels: they must pair up one to one")
    if not predictions:
        raise GlmtuneError("nothing to score: 0 prediction/label pairs")
    pairs = list(zip(predictions, labels))
    workers = min(max(1, num_workers), len(pairs) // MIN_PAIRS_PER_WORKER)
    if workers <= 1:
        per_pair = _score_chunk(pairs)
    else:
        # Contiguous chunks, a few per worker so an unlucky chunk of long texts does not stall the rest.
        size = -(-len(pairs) // (workers * 4))
        chunks = [pairs[i : i + size] for i in range(0, len(pairs), size)]
        with ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_init_jieba) as pool:
            per_pair = [row for chunk in pool.map(_score_chunk, chunks) for row in chunk]

    empty = sum(1 for p, l in pairs if is_blank(p) or is_blank(l))
    if empty:
        logger.warning("%d of %d pairs have an empty prediction or reference; they score 0", empty, len(pairs))
    import numpy as np  # the official mean is np.mean over the rounded per-pair scores

    mean = {key: float(np.mean([row[key] for row in per_pair])) for key in METRIC_KEYS}
    return MetricsResult(mean=mean, per_pair=per_pair, empty=empty)


def read_predictions(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Read `generated_predictions.jsonl` (glmtune) or `generated_predictions.txt` (official).

    Both hold one JSON object per line with string fields `labels` and `predict`; blank lines are skipped.
    Returns (predictions, labels).
    """
    path = Path(path)
    if not path.is_file():
        raise GlmtuneError(f"{path}: no such file")
    predictions: list[str] = []
    labels: list[str] = []
    with contextlib.closing(text_lines(path)) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            row = json_line(f"{path}:{number}", line)
            if not isinstance(row, dict):
                raise GlmtuneError(f"{path}:{number}: expected a JSON object, found {type(row).__name__}")
            for key in ("predict", "labels"):
                if key not in row:
                    raise GlmtuneError(f"{path}:{number}: missing field {key!r} (found {sorted(row)})")
                if not isinstance(row[key], str):
                    raise GlmtuneError(
                        f"{path}:{number}: field {key!r} should be a string, found {type(row[key]).__name__}"
                    )
            predictions.append(row["predict"])
            labels.append(row["labels"])
    if not predictions:
        raise GlmtuneError(f"{path}: no prediction rows")
    return predictions, labels


def write_json(data: dict, path: str | os.PathLike) -> Path:
    """Write `data` as indented UTF-8 JSON atomically (see `glmtune.fsutil.atomic_file`)."""
    return atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def format_table(result: MetricsResult) -> str:
    """A small plain-text table of the mean scores, for the terminal."""
    lines = [f"{'metric':<10}{'score':>10}"]
    lines += [f"{key:<10}{result.mean[key]:>10.4f}" for key in METRIC_KEYS]
    lines.append(f"{'samples':<10}{result.samples:>10d}")
    lines.append(f"{'empty':<10}{result.empty:>10d}")
    return "\n".join(lines)
