"""Tiny random ChatGLM2 models in the official release layout, for tests, demos and CPU experiments.

`init_model` writes what `THUDM/chatglm2-6b` ships, at toy size: a `config.json` with the official fields
(as ../shared/reference/golden-model/model/config.json), weights under the official names
(`transformer.embedding.word_embeddings.weight`, `transformer.encoder.layers.N.self_attention.query_key_value.*`,
..., `transformer.output_layer.weight`) in `model.safetensors` or `pytorch_model.bin`, optionally sharded with
the Hugging Face index json, and a ChatGLM2 tokenizer: a SentencePiece model trained on the given texts
(byte fallback, unk/bos/eos = 0/1/2 as the official model) with the five command tokens after its pieces.

Shapes follow the official modeling code: fused qkv of (heads + 2·groups)·kv_channels rows with a bias,
`dense_h_to_4h` of 2·ffn rows (gate and up), rotary `inv_freq` of kv_channels/4 (rotary on half of each head).

Optionally (`pretrain_steps`, glmtune's own addition, not in any official script) the random base gets a short
seeded language-model pre-training on plain answer texts, so that demos on CPU start from a base that writes
sample-like text and a trained prefix visibly changes what it writes.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from glmtune.errors import GlmtuneError
from glmtune.fsutil import atomic_dir

# Inside the package, so a non-editable install (`pip install .`) has it; data/ in the repository links here.
DATA_DIR = Path(__file__).resolve().parents[1] / "sample_data"
BUNDLED_FILES = ("adgen_sample/train.json", "adgen_sample/dev.json", "multiturn_sample.json")
N_COMMAND_TOKENS = 5  # [MASK] [gMASK] [sMASK] sop eop, appended by the tokenizer class
VOCAB_MULTIPLE = 64  # the official padded_vocab_size (65024) is the tokenizer size rounded up to 64
# Always in the character set, so ASCII never needs byte fallback even if the texts lack it.
ASCII_CHARS = "".join(chr(c) for c in range(33, 127))
INIT_STD = 0.02


@dataclass(frozen=True)
class TinyConfig:
    layers: int = 2
    hidden_size: int = 64
    heads: int = 4
    kv_channels: int = 16
    groups: int = 2
    ffn_hidden_size: int = 160
    seq_length: int = 2048

    def validate(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise GlmtuneError(f"init-model: --{name.replace('_', '-')} must be a positive integer, found {value!r}")
        if self.heads % self.groups:
            raise GlmtuneError(f"init-model: --heads ({self.heads}) must be a multiple of --groups ({self.groups})")
        if self.kv_channels % 4:
            # rotary covers half of each head in pairs, so kv_channels/2 must be even
            raise GlmtuneError(f"init-model: --kv-channels must be a multiple of 4, found {self.kv_channels}")


def bundled_texts(data_dir: Path = DATA_DIR) -> list[str]:
    """Prompts (in the chat template) and responses of glmtune's bundled sample data."""
    from glmtune.families.chatglm2.tokenizer import build_prompt

    texts = []
    for name in BUNDLED_FILES:
        path = data_dir / name
        if not path.is_file():
            raise GlmtuneError(f"{path}: bundled sample data not found; pass texts (--text-file) to train the tokenizer")
        for row in _json_lines(path):
            if "content" in row:
                texts += [build_prompt(row["content"]), row["summary"]]
            else:
                texts += [build_prompt(row["prompt"], row["history"]), row["response"]]
    return texts


def bundled_lm_texts(data_dir: Path = DATA_DIR) -> list[str]:
    """The answers of the bundled sample data (ADGEN summaries, multi-turn replies), as plain documents: what
    `pretrain_base` teaches, so the base writes ADGEN-like sentences without having seen a prompt -> answer pair."""
    texts = []
    for name in BUNDLED_FILES:
        for row in _json_lines(data_dir / name):
            texts += [row["summary"]] if "summary" in row else [row["response"], *(a for _, a in row["history"])]
    return texts


def read_text_file(path: str | Path) -> list[str]:
    """Texts of a file: every string value of a JSON-object line (so ADGEN / glmtune data files work as is),
    the raw line otherwise; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise GlmtuneError(f"{path}: text file not found")
    texts = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            texts += list(_strings(row)) if isinstance(row, dict) else [line]
    return texts


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        if value:
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _json_lines(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise GlmtuneError(f"{path}, line {number}: not valid JSON ({exc.msg})") from exc


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 2000) -> Path:
    """Train a small SentencePiece model on `texts` and save it as a ChatGLM2 tokenizer into `out_dir`.

    Deterministic (one thread, no sentence sampling). The settings mirror the official model where it
    matters: BPE with byte fallback so any text encodes without <unk>, ids 0/1/2 = <unk>/<s>/</s>,
    whitespace kept as is, digits split. `vocab_size` is an upper bound: a small corpus yields fewer pieces.
    """
    import sentencepiece as spm

    from glmtune.families.chatglm2.tokenizer import TOKENIZER_FILE, ChatGLM2Tokenizer

    texts = [t for t in texts if t]
    if not texts:
        raise GlmtuneError("train_tokenizer: no texts to train the tokenizer on")
    if vocab_size < 300:
        raise GlmtuneError(
            f"init-model: --vocab-size must be at least 300 (3 controls + 256 bytes + pieces), found {vocab_size}"
        )
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buffer,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            byte_fallback=True,
            character_coverage=1.0,
            required_chars=ASCII_CHARS,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            max_sentence_length=1 << 16,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise GlmtuneError(f"train_tokenizer: SentencePiece training failed: {exc}") from exc
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / TOKENIZER_FILE
        model_file.write_bytes(buffer.getvalue())
        ChatGLM2Tokenizer(vocab_file=model_file).save_pretrained(out_dir)
    return out_dir


def official_config(cfg: TinyConfig, padded_vocab_size: int) -> dict:
    """config.json with the fields (and order) of the official ChatGLM2 release, minus remote-code hooks."""
    return {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": cfg.hidden_size,
        "kv_channels": cfg.kv_channels,
        "layernorm_epsilon": 1e-05,
        "multi_query_attention": True,
        "multi_query_group_num": cfg.groups,
        "num_attention_heads": cfg.heads,
        "num_layers": cfg.layers,
        "original_rope": True,
        "padded_vocab_size": padded_vocab_size,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": cfg.seq_length,
        "use_cache": True,
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


def glm4_config(cfg: TinyConfig, padded_vocab_size: int, eos_token_ids: list[int], pad_token_id: int) -> dict:
    """config.json of a tiny GLM-4-9B-chat: the ChatGLM layout with GLM-4's fields (as the real
    ../shared/reference/glm-4-9b-chat/config.json: rope_ratio 500, its epsilon, a list of stop ids), the family
    recorded so every command reads it as GLM-4 whatever its (small) vocabulary."""
    from glmtune.model import glm4

    config = official_config(cfg, padded_vocab_size)
    config.update(
        num_hidden_layers=cfg.layers,
        layernorm_epsilon=1.5625e-07,
        rope_ratio=500,
        eos_token_id=list(eos_token_ids),
        pad_token_id=pad_token_id,
        glmtune_family=glm4.FAMILY,
    )
    return config


def _glm4_tokenizer_maker():
    """The GLM-4 family's small tiktoken tokenizer in the official format (glmtune.families.glm4.tiny), as one call:
    `make(texts, out_dir, vocab_size) -> tokenizer` (its size and the ids of its stop tokens are what the model needs)."""
    from glmtune.families.glm4.tiny import write_tiny_tokenizer
    from glmtune.families.tokenizer import load_tokenizer
    from glmtune.model import glm4

    def make(texts: list[str], out_dir: Path, vocab_size: int):
        write_tiny_tokenizer(out_dir, texts, vocab_size=vocab_size)
        tokenizer = load_tokenizer(out_dir)  # its tokenizer_config.json records the family
        if getattr(tokenizer, "family", None) != glm4.FAMILY:
            raise GlmtuneError(f"init-model --family glm4: the tokenizer written is read as {tokenizer.family}")
        return tokenizer

    return make


def write_glm4_model(out_dir: Path, cfg: TinyConfig, tokenizer, seed: int = 0, weights_format: str = "safetensors",
                     shards: int = 1) -> None:
    """config.json + random weights of a tiny GLM-4-9B-chat sized for `tokenizer` (its stop and pad tokens)."""
    padded = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    config = glm4_config(cfg, padded, stops, stops[0])
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    write_weights(random_state_dict(cfg, padded, seed), out_dir, weights_format, shards)


def random_state_dict(cfg: TinyConfig, padded_vocab_size: int, seed: int = 0) -> dict:
    """Official-name weights in module order: matrices ~ N(0, 0.02), RMSNorm weights 1, qkv bias 0."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * INIT_STD

    qkv_rows = (cfg.heads + 2 * cfg.groups) * cfg.kv_channels
    rotary_dim = cfg.kv_channels // 2
    state = {
        "transformer.embedding.word_embeddings.weight": normal(padded_vocab_size, cfg.hidden_size),
        # A buffer in the official checkpoint: 1 / 10000^(2i/d) over d = kv_channels/2.
        "transformer.rotary_pos_emb.inv_freq": 1.0
        / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)),
    }
    for i in range(cfg.layers):
        p = f"transformer.encoder.layers.{i}."
        state[p + "input_layernorm.weight"] = torch.ones(cfg.hidden_size)
        state[p + "self_attention.query_key_value.weight"] = normal(qkv_rows, cfg.hidden_size)
        state[p + "self_attention.query_key_value.bias"] = torch.zeros(qkv_rows)
        state[p + "self_attention.dense.weight"] = normal(cfg.hidden_size, cfg.heads * cfg.kv_channels)
        state[p + "post_attention_layernorm.weight"] = torch.ones(cfg.hidden_size)
        state[p + "mlp.dense_h_to_4h.weight"] = normal(2 * cfg.ffn_hidden_size, cfg.hidden_size)
        state[p + "mlp.dense_4h_to_h.weight"] = normal(cfg.hidden_size, cfg.ffn_hidden_size)
    state["transformer.encoder.final_layernorm.weight"] = torch.ones(cfg.hidden_size)
    state["transformer.output_layer.weight"] = normal(padded_vocab_size, cfg.hidden_size)
    return state


def pretrain_base(
    folder: Path, texts: list[str], steps: int, seed: int = 0, batch_size: int = 8, seq_len: int = 64,
    learning_rate: float = 3e-3,
) -> tuple[dict, list[float]]:
    """A short, seeded language-model pre-training of the tiny model in `folder` on `texts`.

    Why: a random base writes noise, so a prefix trained on it cannot show much (every prediction ends up the
    same sentence). A few hundred steps of next-token training on plain answer texts give a base that writes
    sample-like sentences but has never seen a prompt mapped to its answer, which P-tuning then teaches.
    Texts (each + eos) are concatenated and cut into `seq_len` windows; AdamW with linear decay, clip 1.0.
    Returns the trained weights under the official names (for `write_weights`) and the per-step losses.
    """
    import torch

    from glmtune.families.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(folder)
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    windows = len(stream) // seq_len
    if windows < 1:
        raise GlmtuneError(f"init-model --pretrain-steps: the texts hold {len(stream)} tokens, fewer than one window of {seq_len}")
    data = torch.tensor(stream[: windows * seq_len]).view(windows, seq_len)
    # One thread: a tiny model's matmuls gain nothing from more, and on a busy machine two OpenMP threads
    # spin against each other (measured here under load: 10 steps 56 s with 2 threads, 2.8 s with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain_loop(folder, data, steps, seed, batch_size, learning_rate)
    finally:
        torch.set_num_threads(threads)


def _pretrain_loop(folder: Path, data, steps: int, seed: int, batch_size: int, learning_rate: float):
    import torch

    from glmtune.model.loading import load_model, native_to_official

    windows = data.shape[0]
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = load_model(folder)
    model.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    losses = []
    for _ in range(steps):
        rows = data[torch.randint(windows, (min(batch_size, windows),), generator=generator)]
        loss = model(input_ids=rows, labels=rows, loss_only=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    state = {k: v.detach() for k, v in model.state_dict().items() if not k.startswith("model.rotary_emb.")}
    return native_to_official(state, model.chatglm_config), losses


def _check_weights_args(weights_format: str, shards: int, n_tensors: int) -> None:
    if weights_format not in ("safetensors", "bin"):
        raise GlmtuneError(f"init-model: --format must be 'safetensors' or 'bin', found {weights_format!r}")
    if not isinstance(shards, int) or not 1 <= shards <= n_tensors:
        raise GlmtuneError(f"init-model: --shards must be between 1 and {n_tensors} (the number of tensors), found {shards}")


def write_weights(state: dict, out_dir: Path, weights_format: str = "safetensors", shards: int = 1) -> list[Path]:
    """Save `state` as one file or `shards` contiguous shards of about equal bytes plus the HF index json."""
    import torch

    _check_weights_args(weights_format, shards, len(state))
    stem, ext = ("model", "safetensors") if weights_format == "safetensors" else ("pytorch_model", "bin")
    names = list(state)
    sizes = [state[n].numel() * state[n].element_size() for n in names]
    total = sum(sizes)

    # Cut where the running byte count crosses k/shards of the total, keeping every shard non-empty.
    groups: list[list[str]] = [[] for _ in range(shards)]
    running = 0
    for index, (name, size) in enumerate(zip(names, sizes)):
        shard = min(shards - 1, running * shards // total)
        shard = max(shard, shards - (len(names) - index))  # leave at least one tensor per remaining shard
        shard = min(shard, sum(1 for g in groups if g))  # never skip a shard
        groups[shard].append(name)
        running += size

    def save(tensors: dict, path: Path) -> None:
        if weights_format == "safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
        else:
            torch.save(tensors, path)

    if shards == 1:
        path = out_dir / f"{stem}.{ext}"
        save(state, path)
        return [path]
    written, weight_map = [], {}
    for k, group in enumerate(groups, 1):
        path = out_dir / f"{stem}-{k:05d}-of-{shards:05d}.{ext}"
        save({n: state[n] for n in group}, path)
        weight_map.update(dict.fromkeys(group, path.name))
        written.append(path)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    index_path = out_dir / f"{stem}.{ext}.index.json"
    index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*written, index_path]


def init_model(
    out_dir: str | Path,
    *,
    layers: int = 2,
    hidden_size: int = 64,
    heads: int = 4,
    kv_channels: int = 16,
    groups: int = 2,
    ffn_hidden_size: int = 160,
    seq_length: int = 2048,
    seed: int = 0,
    texts: Iterable[str] | None = None,
    vocab_size: int = 2000,
    weights_format: str = "safetensors",
    shards: int = 1,
    overwrite: bool = False,
    pretrain_steps: int = 0,
    pretrain_texts: Iterable[str] | None = None,
    on_pretrained=None,
    family: str = "chatglm2",
) -> Path:
    """Write a tiny random ChatGLM2 (config, weights, tokenizer) into `out_dir`, atomically.

    `family="chatglm3"` makes a tiny ChatGLM3: the same network, a tokenizer with the four role tokens after
    the command tokens (saved with its family, so every command detects it) and the family in config.json.

    `texts` train the tokenizer (default: the bundled sample data). Everything is built in a temporary
    sibling folder that is renamed into place at the end, so a failure leaves nothing half-written.
    An existing non-empty `out_dir` is an error unless `overwrite`. `pretrain_steps` > 0 gives the random base
    a short language-model pre-training (`pretrain_base`) on `pretrain_texts` (default: the bundled answers, or
    `texts` when given); `on_pretrained(losses)` is called with its losses.
    """
    cfg = TinyConfig(layers, hidden_size, heads, kv_channels, groups, ffn_hidden_size, seq_length)
    cfg.validate()
    _check_weights_args(weights_format, shards, 7 * layers + 4)  # 7 tensors a layer + 4 outside
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise GlmtuneError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise GlmtuneError(f"{out_dir}: folder exists and is not empty (choose another path or pass --overwrite)")
    if not isinstance(pretrain_steps, int) or pretrain_steps < 0:
        raise GlmtuneError(f"init-model: --pretrain-steps must be 0 or a positive integer, found {pretrain_steps!r}")
    lm_texts = None
    if pretrain_steps:
        lm_texts = list(pretrain_texts) if pretrain_texts is not None else (list(texts) if texts is not None else bundled_lm_texts())
    texts = bundled_texts() if texts is None else list(texts)

    if family == "glm4":  # the GLM-4 family: a tiktoken tokenizer and GLM-4's config fields
        make_tokenizer = _glm4_tokenizer_maker()
        with atomic_dir(out_dir) as tmp:
            write_glm4_model(tmp, cfg, make_tokenizer(texts, tmp, vocab_size), seed, weights_format, shards)
            if pretrain_steps:
                state, losses = pretrain_base(tmp, lm_texts, pretrain_steps, seed)
                write_weights(state, tmp, weights_format, shards)
                if on_pretrained is not None:
                    on_pretrained(losses)
        return out_dir

    with atomic_dir(out_dir) as tmp:
        train_tokenizer(texts, tmp, vocab_size=vocab_size)
        from glmtune.families.tokenizer import load_tokenizer

        from glmtune.families.registry import FAMILY_FIELD, get_family

        family_name = get_family(family).name
        tokenizer = load_tokenizer(tmp, family=family_name)
        if family_name != "chatglm2":
            tokenizer.save_pretrained(str(tmp))  # tokenizer_config.json records the family
        padded = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        config = official_config(cfg, padded)
        if family_name != "chatglm2":
            config[FAMILY_FIELD] = family_name
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        write_weights(random_state_dict(cfg, padded, seed), tmp, weights_format, shards)
        if pretrain_steps:
            state, losses = pretrain_base(tmp, lm_texts, pretrain_steps, seed)
            write_weights(state, tmp, weights_format, shards)
            if on_pretrained is not None:
                on_pretrained(losses)
    return out_dir
