"""Batched generation and official BLEU-4 / ROUGE scoring of a ChatGLM2 (+ P-tuning v2) model.

Reproduces the `--do_predict --predict_with_generate` path of THUDM/ChatGLM2-6B `ptuning/main.py`
(run by `ptuning/evaluate.sh`): prompts are `source_prefix + build_prompt(query, history)` cut to
`max_source_length` tokens (see `glmtune.data.preprocess`), the model generates after the prompt, predictions and
references are decoded without special tokens and stripped, scored by `glmtune.evaluation.metrics`, and written as
`generated_predictions` lines `{"labels", "predict"}` and `predict_results.json` with the official keys.

Differences from the official run, on purpose:
- greedy decoding by default (the official run samples with top_p 0.7 / temperature 0.95, so its scores
  change from run to run); `do_sample` with a seed is reproducible;
- prompts are generated in batches, left-padded, longest first (the official batch size is 1);
- the references are the full target texts; `official_truncation` scores against the official labels
  instead (`[gMASK] sop` + target ids cut to `max_target_length`, decoded), for published numbers;
- the generation budget is `max_new_tokens` (default: `max_target_length`) instead of the official
  `max_length = max_source_length + max_target_length + 1` counted over prompt and answer together;
- an empty prediction scores 0 with a warning (the official `rouge_chinese` call crashed on it).

Not in the official scripts: `compare_base` (`glmtune eval --compare-base`) scores the base model (the
same model object with its prefix switched off) next to the tuned one, and measures how far the tuned
answers moved from the base's on a general-purpose file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from glmtune.errors import GlmtuneError
from glmtune.inference.sampling import OFFICIAL_TEMPERATURE, OFFICIAL_TOP_P  # `--do-sample` uses them unless told otherwise

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "generated_predictions.jsonl"
RESULTS_FILE = "predict_results.json"


@dataclass
class GenerationSettings:
    """Decoding options for `model.generate`; greedy unless `do_sample` or `num_beams > 1`."""

    max_new_tokens: int | None = 128  # None: the caller fills it in (run_eval: max_target_length)
    do_sample: bool = False
    top_p: float = OFFICIAL_TOP_P
    temperature: float = OFFICIAL_TEMPERATURE
    num_beams: int = 1
    seed: int = 42

    def validate(self) -> None:
        if self.max_new_tokens is None or self.max_new_tokens < 1:
            raise GlmtuneError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise GlmtuneError(f"num_beams must be at least 1, got {self.num_beams}")
        if not 0.0 < self.top_p <= 1.0:
            raise GlmtuneError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0.0:
            raise GlmtuneError(f"temperature must be positive, got {self.temperature}")

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                                  "num_beams": self.num_beams}
        if self.do_sample:
            # Passed only when sampling: transformers warns about sampling flags on greedy decoding.
            kwargs.update(top_p=self.top_p, temperature=self.temperature)
        return kwargs


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first.

    Similar lengths keep left padding (wasted work) small; longest first makes an out-of-memory batch
    show up at once rather than at the end. The sort is stable, so the batching is deterministic.
    """
    if batch_size < 1:
        raise GlmtuneError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate_token_ids(
    model: Any,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings | None = None,
    batch_size: int = 16,
    pad_token_id: int = 0,
    eos_token_id: int = 2,
    progress: bool = True,
) -> list[list[int]]:
    """The tokens generated after each prompt (ids incl. `[gMASK] sop`), in the order of `prompts`.

    Batches are left-padded; the model derives positions from the mask and keeps the prefix in the KV
    cache, so a batched greedy answer is the answer the prompt gets alone. A row that stops early is
    filled with `pad_token_id` up to the batch's longest answer (as the official trainer pads).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import set_seed

    from glmtune.data.preprocess import collate_eval

    settings = settings or GenerationSettings()
    settings.validate()
    if any(len(p) == 0 for p in prompts):
        raise GlmtuneError("every prompt needs at least one token")
    device = next(model.parameters()).device
    kwargs = settings.generate_kwargs()
    # One seed for the whole run: sampling is reproducible for a given seed and batch size.
    set_seed(settings.seed)

    answers: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc="generating", unit="sample", disable=not progress, dynamic_ncols=True)
    try:
        for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
            padded = collate_eval([{"input_ids": list(prompts[i])} for i in batch], pad_token_id=pad_token_id)
            width = padded["input_ids"].shape[1]
            with torch.inference_mode():
                # Positions are derived from the mask inside the model (and extended by generate).
                output = model.generate(
                    input_ids=padded["input_ids"].to(device), attention_mask=padded["attention_mask"].to(device),
                    pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs,
                )
            # As the official trainer: keep what follows the (padded) prompt.
            for i, ids in zip(batch, output[:, width:].tolist()):
                answers[i] = ids
            bar.update(len(batch))
    finally:
        bar.close()
    return answers


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> list[str]:
    """`generate_token_ids`, decoded without special tokens (eos, padding) and stripped, as the official
    `generated_predictions`."""
    from glmtune.families.registry import stop_ids_for

    # ChatGLM3 answers end at </s>, <|user|> or <|observation|> (glmtune.families.registry); ChatGLM2 ones at </s>.
    stops = stop_ids_for(tokenizer)
    ids = generate_token_ids(model, prompts, settings, batch_size, tokenizer.pad_token_id,
                             stops if len(stops) > 1 else stops[0], progress)
    if len(stops) > 1:  # cut at the stop token: ChatGLM3 decodes role tokens as text
        ids = [next((row[:i] for i, t in enumerate(row) if t in stops), row) for row in ids]
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


# --- files ---------------------------------------------------------------------------------------


def write_predictions(path: str | os.PathLike, predictions: Sequence[str], labels: Sequence[str]) -> Path:
    """The official `generated_predictions` format: one `{"labels", "predict"}` JSON line per sample,
    UTF-8 with the Chinese unescaped; written atomically (`glmtune.fsutil.atomic_file`)."""
    from glmtune.fsutil import atomic_file

    with atomic_file(path) as handle:
        for predict, label in zip(predictions, labels):
            handle.write(json.dumps({"labels": label, "predict": predict}, ensure_ascii=False) + "\n")
    return Path(path)


def results_json(result: Any, runtime: float) -> dict[str, Any]:
    """`predict_results.json`: the official metric keys and the Trainer's runtime keys (same rounding)."""
    out = result.to_json("predict")
    out["predict_runtime"] = round(runtime, 4)
    out["predict_samples_per_second"] = round(result.samples / runtime, 3) if runtime > 0 else None
    return out


def format_summary(results: dict[str, Any]) -> str:
    """The terminal table: scores, sample count, runtime and throughput."""
    rows = [(key, f"{results[f'predict_{key}']:.4f}") for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l")]
    rows += [("samples", str(results["predict_samples"])), ("empty", str(results.get("empty_predictions", 0))),
             ("runtime s", f"{results['predict_runtime']:.2f}"),
             ("samples/s", f"{results['predict_samples_per_second']}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"{'metric':<{width}}  {'value':>10}"] + [f"{k:<{width}}  {v:>10}" for k, v in rows])


# --- the whole evaluation ------------------------------------------------------------------------


@dataclass
class EvalOutput:
    results: dict[str, Any]
    predictions: list[str]
    labels: list[str]
    predictions_file: Path
    results_file: Path
    # Rows read but not evaluated because their prompt or response is empty (the official filter):
    # {"empty_prompt", "empty_response", "total"}; a count is None where the stored data cannot tell.
    dropped: dict[str, int | None] | None = None


def dropped_rows_message(dropped: dict[str, int | None] | None, evaluated: int) -> str | None:
    """'N rows ... dropped' for the terminal, or None when nothing was dropped."""
    if not dropped or not dropped.get("total"):
        return None
    parts = [f"{dropped[k]} with an empty {k.split('_')[1]}" for k in ("empty_response", "empty_prompt") if dropped.get(k)]
    detail = f" ({', '.join(parts)})" if parts else " (empty prompt or response)"
    return (f"{dropped['total']} of {dropped['total'] + evaluated} rows dropped{detail}: the official preprocessing "
            f"skips rows without a prompt or a reference; {evaluated} evaluated")


def evaluate(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    output_dir: str | os.PathLike,
    settings: GenerationSettings | None = None,
    batch_size: int = 16,
    official_truncation: bool = False,
    num_workers: int = 1,
    progress: bool = True,
) -> EvalOutput:
    """Generate for every row of an eval `dataset` (from `glmtune.data.preprocess.tokenize_eval` / `glmtune.data.store.load_or_build_dataset`),
    score against its references, write `OUT/generated_predictions.jsonl` and `OUT/predict_results.json`."""
    from glmtune.data import preprocess as data
    from glmtune.evaluation import metrics

    if len(dataset) == 0:
        raise GlmtuneError("the eval data has no rows to generate for")
    labels = [text.strip() for text in data.eval_references(dataset, tokenizer, official_truncation)]
    start = time.perf_counter()
    predictions = generate_texts(model, tokenizer, list(dataset["input_ids"]), settings, batch_size, progress)
    result = metrics.compute_metrics(predictions, labels, num_workers=num_workers)
    runtime = time.perf_counter() - start

    out = Path(output_dir)
    predictions_file = write_predictions(out / PREDICTIONS_FILE, predictions, labels)
    results = results_json(result, runtime)
    results_file = metrics.write_json(results, out / RESULTS_FILE)
    return EvalOutput(results, predictions, labels, predictions_file, results_file)


def load_eval_data(
    tokenizer: Any,
    test_file: str | os.PathLike | None,
    dataset_dir: str | os.PathLike | None,
    config: Any,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 1,
) -> tuple[Any, Any, dict[str, int | None]]:
    """(dataset, effective DataConfig, rows dropped as empty) from a raw file (tokenized once and cached) or
    a folder written by `glmtune preprocess --mode eval`. A preprocessed folder keeps the settings it was
    made with; only `max_samples` still applies (the first N rows read, before empty ones were dropped,
    as on a raw file).
    """
    from glmtune.data import store as dataset_store

    if (test_file is None) == (dataset_dir is None):
        raise GlmtuneError("give exactly one of --test-file (raw data) or --dataset (a `glmtune preprocess` folder)")
    if test_file is not None:
        if Path(test_file).is_dir():
            raise GlmtuneError(f"{test_file}: is a folder; pass a preprocessed folder with --dataset")
        dataset, report = dataset_store.load_or_build_dataset(test_file, tokenizer, config, mode="eval",
                                                              cache_dir=cache_dir, num_workers=num_workers)
        return dataset, config, dict(report["rows_skipped"])
    # `read_meta` (inside) checks the stored settings; max_samples picks rows as it would on the raw file.
    dataset, report, meta = dataset_store.load_preprocessed(dataset_dir, tokenizer, mode="eval",
                                                            max_samples=config.max_samples)
    if config.max_samples is None:
        dropped = dict(report["rows_skipped"])
    else:  # the stored report covers every row; the folder records which rows were dropped, not why
        total = sum(1 for i in meta["skipped_rows"] if i < config.max_samples)
        dropped = {"empty_prompt": None, "empty_response": None, "total": total}
    return dataset, dataclasses.replace(meta["config"], max_samples=config.max_samples), dropped


def _checked_inputs(output_dir, config, settings) -> tuple[Any, GenerationSettings, Path]:
    """Defaults filled in and checked, and an output path that is not a file: before anything loads."""
    from glmtune.data import preprocess as data

    config = config or data.DataConfig()
    config.validate()
    settings = settings or GenerationSettings(max_new_tokens=None)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise GlmtuneError(f"{out}: exists and is not a folder")
    return config, settings, out


def _with_answer_budget(settings: GenerationSettings, config: Any) -> GenerationSettings:
    """max_new_tokens of None means the data's max_target_length (known once the data is read)."""
    if settings.max_new_tokens is None:
        settings = dataclasses.replace(settings, max_new_tokens=config.max_target_length)
    settings.validate()
    return settings


def run_eval(
    model_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    test_file: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    config: Any = None,
    ptuning_checkpoint: str | os.PathLike | None = None,
    pre_seq_len: int | None = None,
    prefix_projection: bool | None = None,
    quantization_bit: int | None = None,
    settings: GenerationSettings | None = None,
    batch_size: int = 16,
    official_truncation: bool = False,
    dtype: str | None = "auto",
    device: str | None = "auto",
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 1,
    progress: bool = True,
    family: str | None = None,
) -> EvalOutput:
    """Load the model (and P-tuning checkpoint), read the eval data, and `evaluate`; what `glmtune eval` runs.

    `family` (chatglm2, chatglm3) overrides the one detected from the model folder (glmtune.families.registry).

    `settings.max_new_tokens` of None means `config.max_target_length`.
    """
    from glmtune.model.loading import load_model
    from glmtune.families.tokenizer import load_tokenizer

    if batch_size < 1:
        raise GlmtuneError(f"--batch-size must be at least 1, got {batch_size}")
    config, settings, out = _checked_inputs(output_dir, config, settings)

    tokenizer = load_tokenizer(model_path, family=family)
    # Data first: a wrong column or a malformed line fails before the (slow) model load.
    dataset, config, dropped = load_eval_data(tokenizer, test_file, dataset_dir, config, cache_dir, num_workers)
    settings = _with_answer_budget(settings, config)
    from glmtune.model.loading import resolve_device  # one auto device/dtype rule for train, eval and chat

    device, dtype = resolve_device(device, dtype)
    model = load_model(model_path, ptuning_checkpoint=ptuning_checkpoint, pre_seq_len=pre_seq_len,
                       prefix_projection=prefix_projection, quantization_bit=quantization_bit, dtype=dtype,
                       device=device, family=tokenizer.family)
    output = evaluate(model, tokenizer, dataset, out, settings, batch_size, official_truncation, num_workers, progress)
    output.dropped = dropped
    return output


# --- base vs tuned (`glmtune eval --compare-base`) -------------------------------------------------

COMPARISON_FILE = "comparison.json"
GENERAL_PREDICTIONS_FILE = "general_predictions.jsonl"


@contextlib.contextmanager
def prefix_disabled(model: Any):
    """The same model object without its P-tuning prefix: the frozen base, without a second copy in memory."""
    saved = model.prefix_config
    model.prefix_config = None  # pre_seq_len reads 0: no prefix keys/values, no prefix positions in the mask
    try:
        yield model
    finally:
        model.prefix_config = saved


def compare_base(
    model_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    test_file: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    general_file: str | os.PathLike | None = None,
    config: Any = None,
    ptuning_checkpoint: str | os.PathLike | None = None,
    quantization_bit: int | None = None,
    settings: GenerationSettings | None = None,
    batch_size: int = 16,
    official_truncation: bool = False,
    dtype: str | None = "auto",
    device: str | None = "auto",
    num_workers: int = 1,
    progress: bool = True,
    family: str | None = None,
) -> dict[str, Any]:
    """Score the base model (prefix off) and the tuned one on the same rows (OUT/base, OUT/tuned), and on an
    optional general-purpose file measure how far the tuned greedy answers moved from the base's: the share
    of identical answers and the mean ROUGE-L of tuned against base answers. Writes OUT/comparison.json."""
    from glmtune.evaluation import metrics
    from glmtune.model.loading import load_model, resolve_device
    from glmtune.families.tokenizer import load_tokenizer

    config, settings, out = _checked_inputs(output_dir, config, settings)
    tokenizer = load_tokenizer(model_path, family=family)
    dataset, config, _ = load_eval_data(tokenizer, test_file, dataset_dir, config, None, num_workers)
    general = None
    if general_file is not None:
        general, _, _ = load_eval_data(tokenizer, general_file, None, config, None, num_workers)  # same columns and limits
    settings = _with_answer_budget(settings, config)
    device, dtype = resolve_device(device, dtype)
    model = load_model(model_path, ptuning_checkpoint=ptuning_checkpoint, quantization_bit=quantization_bit,
                       dtype=dtype, device=device, family=tokenizer.family)
    if not model.pre_seq_len:
        raise GlmtuneError("--compare-base needs a tuned model: pass --ptuning-checkpoint (or a merged model with a prefix)")
    tuned = evaluate(model, tokenizer, dataset, out / "tuned", settings, batch_size, official_truncation, num_workers, progress)
    with prefix_disabled(model):
        base = evaluate(model, tokenizer, dataset, out / "base", settings, batch_size, official_truncation, num_workers, progress)
    comparison: dict[str, Any] = {"base": base.results, "tuned": tuned.results}
    if general is not None:
        prompts = list(general["input_ids"])
        tuned_answers = generate_texts(model, tokenizer, prompts, settings, batch_size, progress)
        with prefix_disabled(model):
            base_answers = generate_texts(model, tokenizer, prompts, settings, batch_size, progress)
        rouge = metrics.compute_metrics(tuned_answers, base_answers).mean["rouge-l"]
        comparison["general"] = {
            "file": str(general_file), "samples": len(prompts),
            "identical_share": sum(a == b for a, b in zip(tuned_answers, base_answers)) / len(prompts),
            "rouge-l_tuned_vs_base": rouge,
        }
        lines = [json.dumps({"base": b, "tuned": t}, ensure_ascii=False) for b, t in zip(base_answers, tuned_answers)]
        from glmtune.fsutil import atomic_write_text

        atomic_write_text(out / GENERAL_PREDICTIONS_FILE, "".join(line + "\n" for line in lines))
    metrics.write_json(comparison, out / COMPARISON_FILE)
    return comparison


def format_comparison(comparison: dict[str, Any]) -> str:
    """Base and tuned scores side by side (+ the general-file divergence)."""
    rows = [f"{'metric':<10} {'base':>10} {'tuned':>10}"]
    for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        rows.append(f"{key:<10} {comparison['base'][f'predict_{key}']:>10.4f} {comparison['tuned'][f'predict_{key}']:>10.4f}")
    if "general" in comparison:
        g = comparison["general"]
        rows.append(f"general file ({g['samples']} rows): {100 * g['identical_share']:.1f}% identical answers, "
                    f"ROUGE-L tuned vs base {g['rouge-l_tuned_vs_base']:.2f}")
    return "\n".join(rows)
