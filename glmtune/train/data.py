"""Training data of `glmtune train`: which rows a global batch holds, the keys of their prefix dropout, and loading
the training, validation and `--mix-file` rows.

Everything here is a pure function of (seed, position in the data stream), which is what makes a resumed
run (or one with another process count) see exactly the batches and dropout masks of an uninterrupted one.
`--group-by-length` uses transformers' own `get_length_grouped_indices` (the logic of its
`LengthGroupedSampler`) with a generator seeded by (seed, epoch), so it keeps that property.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from glmtune.errors import GlmtuneError
from glmtune.train.config import TrainConfig


# --- data order and dropout --------------------------------------------------------------------


class DataStream:
    """Global sample positions -> dataset rows; epoch e is a permutation seeded by seed + e.

    With `lengths` and `batch_size` (transformers' `group_by_length`): the epoch is ordered by
    transformers' `get_length_grouped_indices` (mega-batches of rows sorted by length, the longest batch
    first), so a global batch holds rows of similar length; still a pure function of (seed, epoch).
    With `mix_rows` / `mix_count` (`--mix-file`): rows `rows .. rows+mix_rows-1` are a general-purpose set,
    and each epoch adds `mix_count` of them drawn by (seed, epoch) to the `rows` training rows.
    """

    def __init__(self, rows: int, seed: int, lengths: list[int] | None = None, batch_size: int = 0,
                 mix_rows: int = 0, mix_count: int = 0):
        self.rows, self.seed = rows, seed
        self.lengths, self.batch_size = lengths, batch_size
        self.mix_rows, self.mix_count = mix_rows, mix_count if mix_rows else 0
        self._epoch, self._perm = -1, []

    @property
    def epoch_rows(self) -> int:
        return self.rows + self.mix_count

    def _epoch_rows(self, epoch: int) -> list[int]:
        if not self.mix_count:
            return list(range(self.rows))
        # A separate generator, so the training rows' order does not depend on the mixing.
        generator = torch.Generator().manual_seed(self.seed + epoch + 1_000_003)
        if self.mix_count <= self.mix_rows:
            drawn = torch.randperm(self.mix_rows, generator=generator)[: self.mix_count]
        else:  # more general rows asked for than there are: draw with replacement
            drawn = torch.randint(self.mix_rows, (self.mix_count,), generator=generator)
        return list(range(self.rows)) + [self.rows + int(i) for i in drawn]

    def row(self, position: int) -> int:
        epoch, offset = divmod(position, self.epoch_rows)
        if epoch != self._epoch:
            items = self._epoch_rows(epoch)
            generator = torch.Generator().manual_seed(self.seed + epoch)
            if self.lengths is not None and self.batch_size > 0:
                from transformers.trainer_pt_utils import get_length_grouped_indices

                order = get_length_grouped_indices([self.lengths[i] for i in items], self.batch_size, generator=generator)
            else:
                order = torch.randperm(len(items), generator=generator).tolist()
            self._perm, self._epoch = [items[i] for i in order], epoch
        return self._perm[offset]


def dropout_keys(seed: int, positions: list[int]) -> list[int]:
    """The prefix-dropout seed of each row (`glmtune.model.prefix.keyed_dropout`): a function of (seed, the row's
    position in the data stream) only, so a row gets the same mask whichever process or restart computes it.
    (Python's hash of a tuple of ints is the same in every process and run: no hash randomisation for ints.)"""
    return [hash((seed, position)) & (2**63 - 1) for position in positions]


def make_batch(dataset, stream: DataStream, positions: list[int], pad_id: int, device: torch.device) -> dict:
    from glmtune.data.preprocess import collate_train

    columns = dataset[[stream.row(p) for p in positions]]
    features = [{"input_ids": i, "labels": l} for i, l in zip(columns["input_ids"], columns["labels"])]
    return {k: v.to(device) for k, v in collate_train(features, pad_token_id=pad_id).items()}


@dataclass
class TrainData:
    train: object  # datasets.Dataset of input_ids/labels: training rows, then the --mix-file rows
    rows: int  # training rows (the first `rows` of `train`)
    mix_rows: int = 0
    validation: object | None = None


def load_train_data(config: TrainConfig, tokenizer, dist, say) -> TrainData:
    """Training rows (+ --mix-file rows after them) and validation rows (--validation-file or a --val-size split)."""
    from glmtune.data.preprocess import DataConfig, format_report
    from glmtune.data.store import load_or_build_dataset

    if config.dataset and not Path(config.dataset).is_dir():
        raise GlmtuneError(f"--dataset {config.dataset}: not a folder (pass raw files with --train-file)")
    if config.train_file and Path(config.train_file).is_dir():
        raise GlmtuneError(f"--train-file {config.train_file}: is a folder (pass `glmtune preprocess` output with --dataset)")
    data_config = config.data_config()
    whole = DataConfig(**{**data_config.__dict__, "max_samples": None})

    def build(source, settings):
        return load_or_build_dataset(source, tokenizer, settings, mode="train", num_workers=config.preprocessing_num_workers)

    def load(source, settings):
        # The main process tokenizes and fills the cache first; the others then read it.
        if dist.main:
            dataset, report = build(source, settings)
        dist.barrier()
        if not dist.main:
            dataset, report = build(source, settings)
        return dataset.select_columns(["input_ids", "labels"]), report

    train, report = load(config.dataset or config.train_file, data_config)
    say(format_report(report))  # max_train_samples was applied by the dataset store (official rule)
    validation = None
    if config.validation_file:
        validation, _ = load(config.validation_file, whole)
    elif config.val_size:
        held = math.ceil(config.val_size * len(train))
        if held >= len(train):
            raise GlmtuneError(f"--val-size {config.val_size}: would hold out all {len(train)} training rows")
        # A seeded permutation + select rather than datasets' train_test_split: that one, on a dataset read
        # from disk, either writes index files beside the (shared) cache entry or, with keep_in_memory,
        # fails on its own generated cache-file names.
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed)).tolist()
        validation = train.select(sorted(order[:held]), keep_in_memory=True)
        train = train.select(sorted(order[held:]), keep_in_memory=True)
        say(f"--val-size {config.val_size}: {len(validation)} of the {len(train) + len(validation)} rows held out for validation (seed {config.seed})")
    rows, mix_rows = len(train), 0
    if config.mix_file:
        import datasets

        mix, _ = load(config.mix_file, whole)
        mix_rows = len(mix)
        train = datasets.concatenate_datasets([train, mix])
        wanted = round(config.mix_ratio * rows)  # what the trainer's DataStream draws per epoch
        if wanted > mix_rows:
            say(f"WARNING: --mix-ratio {config.mix_ratio:g} asks for {wanted} --mix-file rows per epoch "
                f"({config.mix_ratio:g} x {rows} training rows), but {config.mix_file} has {mix_rows}: each is drawn "
                f"about {wanted / mix_rows:.1f} times per epoch (the same rows over and over); a ratio of at most "
                f"{mix_rows / rows:.3g} uses each at most once")
    return TrainData(train, rows, mix_rows, validation)
