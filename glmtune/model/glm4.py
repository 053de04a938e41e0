"""What the model side needs to know about GLM-4: which folders are GLM-4, its rotary rule, the 0414 layout.

Two GLM-4 releases, two folder layouts, one prefix convention:

* GLM-4-9B-chat (2024) ships in the ChatGLM layout (`model_type: chatglm`, `transformer.encoder.layers.*`,
  fused `query_key_value`), the network of ChatGLM2/3 with a 151,552-row padded vocabulary, q/k/v bias,
  RMSNorm, and `rope_ratio` 500 that scales the rotary base: the official `RotaryEmbedding` builds its
  frequencies from `base = 10000 * rope_ratio` (the checkpoint's `rotary_pos_emb.inv_freq` buffer holds the
  base-10000 values and is not used). transformers' conversion script writes `rope_theta` 10000 whatever the
  ratio, which is why this folder is read here rather than converted. It loads onto `GlmForCausalLM`.
* GLM-4-9B-0414 (2025) ships in transformers' own layout (`model_type: glm4`, `Glm4ForCausalLM`, with the
  post-attention and post-MLP "sandwich" norms); its config is transformers' own and is used as it is.

The family registry (`glmtune.families`) holds GLM-4's chat rules; its rotary rule is `glm4_rope_parameters`
below (base scaling, the rule ChatGLM3-6B-32k also has). The model side detects a GLM-4 folder on its own
(`is_glm4_config`) so that a bare weight folder with no tokenizer still gets the right rotary base.
"""

from __future__ import annotations

FAMILY = "glm4"
# The padded vocabulary of every GLM-4 release (151,329 BPE ranks + 14 special tokens + unused rows to 151,552).
PADDED_VOCAB = 151552
# transformers' model_type of the GLM-4-0414 layout (Glm4ForCausalLM); the ChatGLM layout says "chatglm".
HF_MODEL_TYPE = "glm4"
# The official generation config's stop list: <|endoftext|>, <|user|>, <|observation|>.
EOS_TOKEN_IDS = (151329, 151336, 151338)
PAD_TOKEN_ID = 151329


def glm4_rope_parameters(rope_ratio: float) -> dict:
    """transformers `rope_parameters` of GLM-4-9B-chat: half of each head rotated, base 10000 * rope_ratio."""
    return {"rope_type": "default", "rope_theta": 10000.0 * float(rope_ratio), "partial_rotary_factor": 0.5}


def is_hf_glm4(cfg: dict) -> bool:
    """A GLM-4-0414 folder in transformers' layout (`Glm4ForCausalLM`)."""
    return cfg.get("model_type") == HF_MODEL_TYPE


def is_glm4_config(cfg: dict, family_field: str = "glmtune_family") -> bool:
    """Whether a config.json (dict) describes a GLM-4 model: recorded as such by glmtune, in the 0414 layout,
    or an official ChatGLM-layout folder with GLM-4's padded vocabulary (ChatGLM2/3 have 65,024)."""
    if cfg.get(family_field) is not None:
        return cfg[family_field] == FAMILY
    return is_hf_glm4(cfg) or cfg.get("padded_vocab_size") == PADDED_VOCAB


def hf_attention_dims(cfg: dict) -> tuple[int, int, int]:
    """(query heads, key/value groups, head width) of a transformers Glm4 config dict."""
    heads = cfg["num_attention_heads"]
    groups = cfg.get("num_key_value_heads") or heads
    return heads, groups, cfg.get("head_dim") or cfg["hidden_size"] // heads
