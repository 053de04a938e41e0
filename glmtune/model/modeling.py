"""ChatGLM2-6B on transformers' native `GlmForCausalLM`, with the official P-tuning v2 prefix.

The base network is transformers' `GlmForCausalLM`, which computes what THUDM/chatglm2-6b
`modeling_chatglm.py` computes once the weights are renamed (see `glmtune.model.loading`). This module adds
what the native model cannot express:

* the official prefix (`glmtune.model.prefix.PrefixEncoder`) fed as past keys/values of every layer, with
  real tokens numbered from position 0 (as `ChatGLMModel.forward` does) instead of after the prefix;
* the attention mask the official `get_masks` builds: every real token sees the whole prefix, causal
  among real tokens, left padding masked; passed as a ready 4-D mask so transformers does not
  re-derive it from cache lengths (which would count the prefix as positions);
* `generate()` that keeps both of the above: the 2-D attention mask and position ids cover the real
  tokens only, the prefix lives in the cache;
* `prefix_mask`: rows of one batch may carry different prefixes (different adapters, different
  pre_seq_len) that the caller placed in the cache as one padded block; each row sees only its own
  slots (used by `glmtune.serve`);
* every linear layer is a `glmtune.model.cpu_linear.OneDNNLinear`: same parameters, but in fp32 on CPU a frozen
  weight's products (inference, and the base layers in training) run on oneDNN, 2-3x faster than torch's
  default (MKL) on the project's machine;
* `loss_only=True`, used in training: the LM head runs only on positions that have a label. The
  official code projects every position to the 65k vocabulary, a third of which are prompt tokens
  whose logits are thrown away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from glmtune.compat import allow_checkpointing_with_cache, ready_attention_mask
from glmtune.model.cpu_linear import use_onednn_linears
from glmtune.data.preprocess import IGNORE_INDEX
from glmtune.families.registry import FAMILY_FIELD, get_family
from glmtune.model.glm4 import glm4_rope_parameters, is_glm4_config, is_hf_glm4
from glmtune.model.prefix import PEFT_PREFIX_DROPOUT, PREFIX_DROPOUT, PrefixConfig, PrefixEncoder, PrefixKV


def attention_dims(cfg: dict) -> tuple[int, int, int]:
    """(query heads, key/value groups, kv_channels) of an official ChatGLM2 config dict."""
    heads = cfg["num_attention_heads"]
    groups = cfg["multi_query_group_num"] if cfg.get("multi_query_attention", False) else heads
    return heads, groups, cfg.get("kv_channels") or cfg["hidden_size"] // heads


def glm_config_from_chatglm(cfg: dict) -> GlmConfig:
    """The native GlmConfig equivalent to an official ChatGLM2 config.json (dict)."""
    heads, groups, kv_channels = attention_dims(cfg)
    config = GlmConfig(
        vocab_size=cfg["padded_vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=kv_channels,
        hidden_act="silu",
        max_position_embeddings=cfg.get("seq_length", 32768),
        rms_norm_eps=cfg.get("layernorm_epsilon", 1e-5),
        attention_bias=cfg.get("add_qkv_bias", True),
        attention_dropout=cfg.get("attention_dropout", 0.0),
        rope_parameters=_rope_parameters(cfg),
        pad_token_id=cfg.get("pad_token_id", 0),
        eos_token_id=cfg.get("eos_token_id", 2),
        bos_token_id=None,
        tie_word_embeddings=False,
        use_cache=True,
        attn_implementation="sdpa",
    )
    return config


def _rope_parameters(cfg: dict) -> dict:
    """ChatGLM rotates half of each head with base 10000; `rope_ratio` (the 32k releases) means position
    interpolation for ChatGLM2 and base scaling for ChatGLM3: the family decides (glmtune.families.registry).
    GLM-4-9B-chat scales the base (10000 * 500); it is recognised from its config alone (glmtune.model.glm4)."""
    ratio = float(cfg.get("rope_ratio") or 1.0)
    if is_glm4_config(cfg, FAMILY_FIELD):
        return glm4_rope_parameters(ratio)
    return get_family(cfg.get(FAMILY_FIELD)).rope_parameters(ratio)


def glm4_config_from_hf(cfg: dict) -> Glm4Config:
    """The `Glm4Config` of a GLM-4-0414 config.json (transformers' own layout), minus glmtune's own fields."""
    own = {"pre_seq_len", "prefix_projection", "quantization_bit", FAMILY_FIELD}
    fields = {k: v for k, v in cfg.items() if k not in own and not k.startswith("_")}
    return Glm4Config(**{**fields, "use_cache": True, "attn_implementation": "sdpa"})


def model_config(cfg: dict) -> GlmConfig | Glm4Config:
    """The transformers config of a model folder's config.json: ChatGLM layout or GLM-4-0414 layout."""
    return glm4_config_from_hf(cfg) if is_hf_glm4(cfg) else glm_config_from_chatglm(cfg)


def model_class(config: GlmConfig | Glm4Config) -> type:
    """glmtune's prefix-carrying model class for a transformers config (see `model_config`)."""
    return Glm4PrefixForCausalLM if isinstance(config, Glm4Config) else ChatGLM2ForCausalLM


class PrefixLMMixin:
    """An optional P-tuning v2 prefix on a transformers causal LM (`GlmForCausalLM` or `Glm4ForCausalLM`, whose
    attention, cache and mask conventions are the same); see the module docstring."""

    def __init__(self, config, prefix: PrefixConfig | None = None):
        super().__init__(config)
        self.prefix_config = prefix
        self.prefix_encoder = None
        if prefix is not None:
            self.prefix_encoder = self.make_prefix_encoder(prefix)
        # The config.json dict this model came from (official ChatGLM layout, or transformers' for GLM-4-0414),
        # written back on save.
        self.chatglm_config: dict = {}
        # fp32 CPU products with frozen weights 2-3x faster (oneDNN instead of MKL); see glmtune.model.cpu_linear.
        use_onednn_linears(self)

    def make_prefix_encoder(self, prefix: PrefixConfig) -> PrefixEncoder:
        """A prefix encoder sized for this model's layers, key/value groups and head width.

        GLM-4's official P-tuning is PEFT prefix tuning, which has no prefix dropout; the ChatGLM2/3 code
        hard-codes 0.1 (the family is what the folder's config says, see glmtune.model.glm4)."""
        c = self.config
        dropout = PEFT_PREFIX_DROPOUT if is_glm4_config(self.chatglm_config or _config_family(c), FAMILY_FIELD) \
            else PREFIX_DROPOUT
        return PrefixEncoder(prefix, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.hidden_size,
                             dropout=dropout)

    @property
    def pre_seq_len(self) -> int:
        return self.prefix_config.pre_seq_len if self.prefix_config else 0

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint every decoder layer; the prefix reaches them through a read-only `PrefixKV`.

        Non-reentrant checkpointing, because the prefix enters each layer through the cache object
        rather than as an argument, and reentrant checkpointing only propagates gradients to arguments.
        transformers drops caches under checkpointing unless the layer declares it only reads them.
        """
        self.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        for layer in self.model.layers:
            allow_checkpointing_with_cache(layer)

    # --- masks and positions ---------------------------------------------------------------------

    def _attention_mask_4d(
        self,
        attention_mask: torch.Tensor,
        past_real: int,
        q_len: int,
        dtype: torch.dtype,
        prefix_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Additive mask [B, 1, q, pre + past + q]: prefix visible (where `prefix_mask` allows), causal + padding on real tokens."""
        device = attention_mask.device
        kv_real = past_real + q_len
        q_idx = torch.arange(past_real, kv_real, device=device)[:, None]
        k_idx = torch.arange(kv_real, device=device)[None, :]
        allowed = (k_idx <= q_idx)[None] & attention_mask[:, None, :kv_real].bool()
        if prefix_mask is not None:
            # Per-row prefixes share one block; each row sees only its own slots.
            slots = prefix_mask.to(device=device, dtype=torch.bool)[:, None, :].expand(-1, q_len, -1)
            allowed = torch.cat([slots, allowed], dim=-1)
        elif self.pre_seq_len:
            ones = allowed.new_ones(allowed.shape[0], q_len, self.pre_seq_len)
            allowed = torch.cat([ones, allowed], dim=-1)
        # In the form transformers passes on untouched (see glmtune.compat): it must not re-derive the mask.
        return ready_attention_mask(allowed, dtype)

    @staticmethod
    def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
        """0, 1, 2, ... on real tokens (left padding gets 0), as the official tokenizer's position_ids."""
        return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)

    def _prefix_kv(self, batch_size: int, dtype: torch.dtype, dropout_keys=None):
        return self.prefix_encoder(batch_size, dtype, dropout_keys)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations (and prefix keys/values) use; quantized int weights compute in fp32."""
        dtype = self.model.embed_tokens.weight.dtype
        return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32

    # --- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        loss_only: bool = False,
        prefix_mask: torch.Tensor | None = None,
        dropout_keys: list[int] | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`attention_mask` / `position_ids` cover the real tokens (past and present); the prefix is internal.

        `prefix_mask` [B, slots] (bool) is for callers that put the prefixes into `cache` themselves
        (the serving scheduler: each row its own prefix, shorter ones padded in a shared block of
        `slots` positions ahead of the real tokens). The model's own prefix encoder is then not used.
        `dropout_keys` (training): one seed per row for the prefix dropout (`glmtune.model.prefix.keyed_dropout`).
        """
        kwargs.pop("return_dict", None)
        if "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        source = input_ids if input_ids is not None else inputs_embeds
        batch_size, q_len = source.shape[:2]
        dtype = self.compute_dtype

        # Training with gradients never uses a growing cache (see PrefixKV).
        if self.training and torch.is_grad_enabled():
            use_cache = False
        elif use_cache is None:
            use_cache = self.config.use_cache
        if prefix_mask is not None and not isinstance(cache, Cache):
            raise ValueError("prefix_mask needs a cache that already holds the prefix block")
        cache, past_real = self._prepare_cache(cache, use_cache, batch_size, dtype, prefix_mask, dropout_keys)
        attention_mask, position_ids, mask4d = self._masks(
            attention_mask, position_ids, past_real, batch_size, q_len, source.device, dtype, prefix_mask
        )
        outputs = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=mask4d,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        logits, loss = self._head(outputs.last_hidden_state, labels, logits_to_keep, loss_only)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    def _prepare_cache(self, cache, use_cache, batch_size, dtype, prefix_mask, dropout_keys=None) -> tuple[object, int]:
        """The cache to run with (the prefix put in first when it is empty) and how many real tokens it holds."""
        if prefix_mask is not None:
            return cache, cache.get_seq_length() - prefix_mask.shape[1]
        pre = self.pre_seq_len
        past = cache.get_seq_length() if isinstance(cache, Cache) else 0
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if pre and isinstance(cache, Cache) and past == 0:
            for layer_idx, (k, v) in enumerate(self._prefix_kv(batch_size, dtype, dropout_keys)):
                cache.update(k, v, layer_idx)
            past = pre
        elif pre and cache is None:
            cache = PrefixKV(self._prefix_kv(batch_size, dtype, dropout_keys))
        return cache, (past - pre if isinstance(cache, Cache) and past else 0)

    def _masks(self, attention_mask, position_ids, past_real, batch_size, q_len, device, dtype, prefix_mask):
        """2-D mask over the real tokens (checked), position ids counted on real tokens, the ready 4-D mask."""
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, past_real + q_len, dtype=torch.long, device=device)
        elif attention_mask.ndim != 2 or attention_mask.shape[1] != past_real + q_len:
            raise ValueError(
                f"attention_mask must be [batch, {past_real + q_len}] over the real tokens "
                f"(past {past_real} + new {q_len}), found {tuple(attention_mask.shape)}"
            )
        if position_ids is None:
            position_ids = self.positions_from_mask(attention_mask)[:, -q_len:]
        mask4d = self._attention_mask_4d(attention_mask, past_real, q_len, dtype, prefix_mask)
        return attention_mask, position_ids, mask4d

    def _head(self, hidden, labels, logits_to_keep, loss_only) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (of the kept positions) and/or the loss."""
        logits = loss = None
        if labels is not None and loss_only:
            return None, self._label_only_loss(hidden, labels)
        if labels is not None:
            logits_to_keep = 0  # the loss needs every position's logits
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        # Always a 2-D input: torch 2.13 runs F.linear on some 3-D inputs (e.g. a prompt's last
        # position, [1, 1, hidden]) as a batched matmul that first copies the whole [vocab, hidden]
        # weight transposed: 0.5 GB and seconds per prompt for ChatGLM2-6B (bench/quant.py --decode-6b).
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = self._project(flat).view(*hidden.shape[:-1], -1)
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=IGNORE_INDEX,
            )
        return logits, loss

    def _project(self, flat: torch.Tensor) -> torch.Tensor:
        """The output layer on [rows, hidden]; one bf16 row on CPU (a decoding step) by torch's own GEMV.

        `torch.mv` reaches torch's bf16 GEMV kernel (fp32 accumulation) whatever `torch.backends.mkldnn` says;
        `F.linear` hands a bf16 product to oneDNN on CPUs where oneDNN takes bf16 matmuls, and for one row oneDNN
        reads the [vocab, hidden] weight at ~2/3 of that speed (6B: 17 vs 12 ms a token on 2 threads;
        bench/quant.py --decode-6b). On CPUs without AVX-512 both are the same kernel. No process-wide flag changes.
        """
        weight, bias = self.lm_head.weight, self.lm_head.bias
        if (flat.shape[0] == 1 and flat.dtype == torch.bfloat16 and flat.device.type == "cpu"
                and isinstance(self.lm_head, nn.Linear) and weight.dtype == torch.bfloat16):
            out = torch.mv(weight, flat[0])[None]
            return out if bias is None else out + bias
        return self.lm_head(flat)

    def _label_only_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over labelled positions, projecting only those to the vocabulary."""
        targets = labels[:, 1:].to(hidden.device)
        keep = targets != IGNORE_INDEX
        selected = hidden[:, :-1][keep]
        logits = self.lm_head(selected).float()
        return F.cross_entropy(logits, targets[keep])


def _config_family(config) -> dict:
    # Before `chatglm_config` is set (a prefix given to the constructor): what the transformers config says.
    return {"model_type": getattr(config, "model_type", None), "padded_vocab_size": config.vocab_size}


class ChatGLM2ForCausalLM(PrefixLMMixin, GlmForCausalLM):
    """ChatGLM-layout models (ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B-chat) on `GlmForCausalLM`, with the prefix."""


class Glm4PrefixForCausalLM(PrefixLMMixin, Glm4ForCausalLM):
    """GLM-4-0414 on transformers' `Glm4ForCausalLM` (sandwich norms), with the same prefix machinery."""
