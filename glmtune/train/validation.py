"""Validation during `glmtune train`: exact validation loss, greedy generation scores, best checkpoint, early stopping.

Follows transformers' Trainer where it has a rule (`metric_for_best_model`, `greater_is_better` inferred
from the metric name, `EarlyStoppingCallback`'s patience and threshold, `save_total_limit` never removing
the best checkpoint), with these deliberate differences:
* The validation loss is the exact token mean over the whole validation set (summed token cross-entropy
  divided by the number of label tokens), the training loss's definition, so it equals one big forward
  over all rows. The Trainer averages per-batch means, which weighs the rows of a short last batch more.
* A checkpoint is saved at every evaluation, so the best evaluation always has a checkpoint to name.
* Generation scores (`--eval-generate K`) use the first K validation rows, greedy, against the decoded
  label tokens (the answer as trained: cut to max_target_length), with the official BLEU-4 / ROUGE.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from glmtune.model.modeling import IGNORE_INDEX

METRIC_KEYS = {"eval_loss": "eval_loss", "bleu-4": "eval_bleu-4", "rouge-1": "eval_rouge-1",
               "rouge-2": "eval_rouge-2", "rouge-l": "eval_rouge-l"}


def validation_loss(model, dataset, batch_size: int, pad_id: int, dist) -> tuple[float, int]:
    """(token-mean loss, label tokens) over all of `dataset`, in eval mode (no dropout), split over processes."""
    from glmtune.data.preprocess import collate_train

    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=dist.device)
    try:
        with torch.no_grad():
            for start in range(dist.rank * batch_size, len(dataset), batch_size * dist.world):
                columns = dataset[start: start + batch_size]
                features = [{"input_ids": i, "labels": l} for i, l in zip(columns["input_ids"], columns["labels"])]
                batch = {k: v.to(dist.device) for k, v in collate_train(features, pad_token_id=pad_id).items()}
                count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                if count == 0:
                    continue
                loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch["position_ids"], labels=batch["labels"], loss_only=True).loss
                totals += torch.stack([loss.detach().double() * count, torch.tensor(count, dtype=torch.float64, device=dist.device)])
    finally:
        model.train(was_training)
    loss_sum, count = dist.all_reduce(totals).tolist()
    return (loss_sum / count if count else float("nan")), int(count)


def prompts_and_references(dataset, tokenizer, k: int) -> tuple[list[list[int]], list[str]]:
    """Prompt ids and answer texts of the first `k` training-format rows.

    A training row is prompt ids (labels -100) then answer ids + eos (labelled), so the prompt is what
    precedes the first label and the reference is the labelled span without the eos, decoded.
    """
    rows = dataset[: min(k, len(dataset))]
    prompts, references = [], []
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        prompts.append(ids[:start])
        answer = [t for t in ids[start:] if t != tokenizer.eos_token_id]
        references.append(tokenizer.decode(answer, skip_special_tokens=True).strip())
    return prompts, references


def generation_scores(model, tokenizer, prompts, references, max_new_tokens: int, batch_size: int) -> tuple[dict, list[str]]:
    """Greedy answers for `prompts` and their official BLEU-4 / ROUGE scores (x100), as `eval_*` keys."""
    from glmtune.evaluation import metrics
    from glmtune.evaluation.generate import GenerationSettings, generate_texts

    was_training = model.training
    model.eval()
    try:
        predictions = generate_texts(model, tokenizer, prompts, GenerationSettings(max_new_tokens=max_new_tokens),
                                     batch_size=batch_size, progress=False)
    finally:
        model.train(was_training)
    result = metrics.compute_metrics(predictions, references)
    return {f"eval_{key}": value for key, value in result.mean.items()}, predictions


@dataclass
class EvalTracker:
    """Best metric so far, the patience counter and the evaluation history: all of it is in trainer_state.json,
    so a resumed run makes the same decisions as an uninterrupted one."""

    metric: str = "eval_loss"
    greater_is_better: bool = False
    patience: int | None = None
    threshold: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    bad_evaluations: int = 0
    history: list[dict] = field(default_factory=list)

    @property
    def key(self) -> str:
        return METRIC_KEYS[self.metric]

    def update(self, record: dict) -> bool:
        """Record an evaluation; True when it is the new best.

        As transformers: the first evaluation is the best so far; later ones must beat the best (strictly)
        to become it, and by more than `threshold` to reset the patience counter.
        """
        value = record[self.key]
        self.history.append(record)
        if not math.isfinite(value):
            self.bad_evaluations += 1
            return False
        better = self.best_metric is None or (value > self.best_metric if self.greater_is_better else value < self.best_metric)
        enough = self.best_metric is None or abs(value - self.best_metric) > self.threshold
        self.bad_evaluations = 0 if (better and enough) else self.bad_evaluations + 1
        if better:
            self.best_metric, self.best_step = value, record["step"]
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evaluations >= self.patience

    def stop_reason(self) -> str:
        return (f"early stopping: {self.key} did not improve by more than {self.threshold} for {self.bad_evaluations} "
                f"evaluations (patience {self.patience}); best {self.best_metric:.6g} at step {self.best_step}")

    def to_state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict | None, **settings) -> EvalTracker:
        """A tracker with `settings` (the current flags) and the progress saved in `state`."""
        tracker = cls(**settings)
        if state:
            tracker.best_metric, tracker.best_step = state.get("best_metric"), state.get("best_step")
            tracker.bad_evaluations = int(state.get("bad_evaluations", 0))
            tracker.history = list(state.get("history", []))
        return tracker


def run_validation(model, tokenizer, dataset, config, dist, step: int, epoch: float) -> tuple[dict, list[str], list[str]]:
    """One evaluation: the loss on every validation row (+ scores on the first K); (record, predictions, references)."""
    t0 = time.perf_counter()
    loss, tokens = validation_loss(model, dataset, config.per_device_eval_batch_size, tokenizer.pad_token_id, dist)
    record = {"step": step, "epoch": round(epoch, 4), "eval_loss": loss, "eval_tokens": tokens}
    predictions, references = [], []
    if config.eval_generate:
        scores = None
        if dist.main:  # one process generates (K is small); the others get the scores it found
            prompts, references = prompts_and_references(dataset, tokenizer, config.eval_generate)
            scores, predictions = generation_scores(model, tokenizer, prompts, references, config.max_target_length,
                                                    config.per_device_eval_batch_size)
        record.update(dist.broadcast(scores))
    record["eval_runtime_s"] = round(time.perf_counter() - t0, 3)
    return record, predictions, references
