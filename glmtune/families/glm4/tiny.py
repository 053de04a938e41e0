"""A small GLM-4 tokenizer in the official format, for tiny GLM-4 models (`glmtune init-model --family glm4`).

`write_tiny_tokenizer` trains a byte-level BPE with the `tokenizers` library on the given texts, split with GLM-4's
own pattern, and writes what the official GLM-4 folder holds: `tokenizer.model` (tiktoken ranks: the 256 bytes, then
one rank per learned merge, in training order, so tiktoken's lowest-rank-first merging replays the training) and
`tokenizer_config.json` with the 14 special tokens right after the ranks and a chat template. The template is
glmtune's own text in the official template's layout (`[gMASK]<sop>`, `<|role|>metadata\\n content`, a tool block
where a message carries `tools`, `<|assistant|>` as the generation prompt), so every GLM-4 code path runs on it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from glmtune.errors import GlmtuneError
from glmtune.families.family import FAMILY_FIELD, TOKENIZER_FILE
from glmtune.fsutil import atomic_file

CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n"
    "You can use the tools below. To call one, write its name on the first line and its arguments as a JSON object "
    "after it.{% for tool in item['tools'] %}{% if tool['type'] == 'function' %}\n\n## {{ tool['function']['name'] }}"
    "\n\n{{ tool['function'] | tojson(indent=4) }}{% endif %}{% endfor %}{% endif %}"
    "{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tiny_tokenizer(out_dir: str | Path, texts: Iterable[str], vocab_size: int = 1000) -> Path:
    """Train a byte-level BPE of at most `vocab_size` ranks (>= 256: every byte is one) on `texts` and write
    `tokenizer.model` + `tokenizer_config.json` into `out_dir`; returns `out_dir`. Deterministic for the same texts."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from glmtune.families.glm4.tokenizer import PAT_STR, SPECIAL_TOKENS, write_ranks

    if vocab_size < 256:
        raise GlmtuneError(f"vocab_size must be at least 256 (one rank per byte), got {vocab_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    # The same split as the tiktoken encoding (GLM-4's pattern), then bytes as GPT-2 style characters.
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    bpe.train_from_iterator(list(texts), trainer)
    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}

    def raw(token: str) -> bytes:
        return bytes(char_to_byte[c] for c in token)

    ranks: dict[bytes, int] = {bytes([b]): i for i, b in enumerate(sorted(bytes_to_unicode()))}
    for merge in json.loads(bpe.to_str())["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = raw(left) + raw(right)
        if token not in ranks and len(ranks) < vocab_size:
            ranks[token] = len(ranks)
    write_ranks(ranks, out_dir / TOKENIZER_FILE)
    n = len(ranks)
    config = {
        "added_tokens_decoder": {str(n + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                              "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)},
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        FAMILY_FIELD: "glm4",
    }
    with atomic_file(out_dir / "tokenizer_config.json", "w") as handle:
        handle.write(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    return out_dir
