"""Encoding speed of the ChatGLM2 tokenizer on ADGEN texts: transformers' generic route vs the fast path.

`glmtune preprocess` encodes every row twice (`[gMASK] sop` + chat prompt, then the bare summary), the way
the official ptuning/main.py does. This times exactly those calls on the ADGEN dev set, once through
transformers' generic `convert_tokens_to_ids(tokenize(text))` route (`use_fast_encode = False`, what the
tokenizer did before) and once through the fast path, plus batched `__call__`, and checks both give the
same output. SentencePiece's own `encode` is the floor. Figures are µs per text, best of `--repeats`
alternating rounds (the machine may be shared, so the best round is the least disturbed one).

    python bench/tokenizer.py [--reference ../shared/reference] [--batch-size 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, print_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = Path(os.environ.get("GLMTUNE_REFERENCE", REPO.parent / "shared" / "reference"))
ADGEN_TRAIN_ROWS = 114_599  # rows of the official AdvertiseGen train.json, for the extrapolated figure


def _us_per_text(fn, n_texts: int) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) / n_texts * 1e6


def _plain(out):
    if hasattr(out, "items"):
        return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in out.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    dev = args.reference / "AdvertiseGen" / "dev.json"
    model_dir = args.reference / "chatglm2-6b"
    if not dev.is_file() or not (model_dir / "tokenizer.model").is_file():
        print(f"skipped: needs {dev} and {model_dir / 'tokenizer.model'} (pass --reference)")
        return

    from glmtune.families.chatglm2.tokenizer import build_prompt
    from glmtune.families.tokenizer import load_tokenizer

    rows = [json.loads(line) for line in dev.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = [build_prompt(r["content"]) for r in rows]
    summaries = [r["summary"] for r in rows]
    texts = prompts + summaries
    tok = load_tokenizer(model_dir)
    bs = args.batch_size
    batches = [texts[i : i + bs] for i in range(0, len(texts), bs)]

    def preprocess_calls():  # what glmtune preprocess / official main.py does per row
        for p, s in zip(prompts, summaries):
            tok.encode(p)
            tok.encode(s, add_special_tokens=False)

    cases = {
        "encode (preprocess: prompt + summary)": preprocess_calls,
        f"__call__ batch {bs}": lambda: [tok(b) for b in batches],
        f"__call__ batch {bs}, padding=True": lambda: [tok(b, padding=True) for b in batches],
        f"__call__ batch {bs}, truncation 64, pt": lambda: [
            tok(b, padding=True, truncation=True, max_length=64, return_tensors="pt") for b in batches
        ],
    }
    floor = min(_us_per_text(lambda: [tok.sp_model.encode(t) for t in texts], len(texts)) for _ in range(args.repeats))

    rows_out = []
    for name, fn in cases.items():
        before, after = [], []
        for _ in range(args.repeats):  # alternate, so a busy moment hits both sides alike
            tok.use_fast_encode = False
            before.append(_us_per_text(fn, len(texts)))
            tok.use_fast_encode = True
            after.append(_us_per_text(fn, len(texts)))
        b, a = min(before), min(after)
        rows_out.append({"case": name, "before_us": round(b, 1), "after_us": round(a, 1), "speedup": round(b / a, 1)})

    # Same outputs both ways, on every text and batch timed above.
    def outputs(fast: bool):
        tok.use_fast_encode = fast
        return (
            [tok.encode(p) for p in prompts],
            [tok.encode(s, add_special_tokens=False) for s in summaries],
            [_plain(tok(b, padding=True)) for b in batches],
            [_plain(tok(b, padding=True, truncation=True, max_length=64, return_tensors="pt")) for b in batches],
        )

    identical = outputs(False) == outputs(True)

    first = rows_out[0]
    per_row = {k: first[k] * 2 for k in ("before_us", "after_us")}  # two texts a row
    print(f"ADGEN dev: {len(rows)} rows, {len(texts)} texts; SentencePiece encode alone: {floor:.1f} µs/text")
    print_table(rows_out, ["case", "before_us", "after_us", "speedup"])
    before_s, after_s = (per_row[k] * ADGEN_TRAIN_ROWS / 1e6 for k in ("before_us", "after_us"))
    print(f"ADGEN train ({ADGEN_TRAIN_ROWS} rows) encoding, one worker: {before_s:.1f} s before, {after_s:.1f} s after")
    print("outputs identical before/after:", identical)

    payload = {
        "texts": len(texts),
        "rows": len(rows),
        "batch_size": bs,
        "repeats": args.repeats,
        "unit": "microseconds per text, best of repeats",
        "sentencepiece_encode_us": round(floor, 1),
        "cases": rows_out,
        "adgen_train_encode_s": {"before": round(before_s, 1), "after": round(after_s, 1)},
        "outputs_identical": identical,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=RESULTS, prefix=".tokenizer-", suffix=".json.tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, ensure_ascii=False)
    os.replace(tmp, RESULTS / "tokenizer.json")
    print("results:", RESULTS / "tokenizer.json")
    if not identical:
        sys.exit("fast and generic encodings differ")


if __name__ == "__main__":
    main()
