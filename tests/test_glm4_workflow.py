"""GLM-4 through glmtune's model-side workflow: a tiny GLM-4 folder, prefix training and its checkpoints,
merging a prefix into a folder, and int4/int8 quantization of both GLM-4 layouts."""

from __future__ import annotations

import json

import pytest
import torch

from glmtune.model.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, GLMTUNE_ADAPTER
from glmtune.model.loading import load_model, save_model
from glmtune.model.quantization import quantize_checkpoint
from glmtune.model.tiny import TinyConfig, glm4_config, random_state_dict, write_weights

TOL = 1e-4


class _SizingTokenizer:
    """What the tiny-model writer asks of a tokenizer: its size and the ids of GLM-4's stop tokens."""

    ids = {"<|endoftext|>": 300, "<|user|>": 307, "<|observation|>": 309}

    def __len__(self):
        return 314

    def convert_tokens_to_ids(self, token):
        return self.ids[token]


@pytest.fixture(scope="module")
def tiny_glm4(tmp_path_factory):
    from glmtune.model.tiny import write_glm4_model

    folder = tmp_path_factory.mktemp("glm4") / "model"
    folder.mkdir()
    write_glm4_model(folder, TinyConfig(layers=2, hidden_size=64, heads=4, kv_channels=16, groups=2), _SizingTokenizer())
    return folder


def test_tiny_glm4_is_a_glm4_chat_layout_with_the_official_fields(tiny_glm4, reference):
    cfg = json.loads((tiny_glm4 / "config.json").read_text())
    real = json.loads((reference / "glm-4-9b-chat" / "config.json").read_text())
    assert set(real) - {"_name_or_path", "transformers_version"} <= set(cfg)
    assert (cfg["padded_vocab_size"], cfg["eos_token_id"], cfg["pad_token_id"]) == (320, [300, 307, 309], 300)
    model = load_model(tiny_glm4)
    assert model.chatglm_config["glmtune_family"] == "glm4"
    assert model.config.rope_parameters["rope_theta"] == 5e6
    assert model.config.eos_token_id == [300, 307, 309]


def test_prefix_training_on_glm4_learns_and_its_checkpoint_resumes(tiny_glm4, tmp_path):
    from glmtune.train.checkpoint import latest_checkpoint, load_checkpoint_state, save_checkpoint

    torch.manual_seed(0)
    model = load_model(tiny_glm4, pre_seq_len=8)
    encoder = model.prefix_encoder
    assert encoder.embedding.weight.shape == (8, 2 * 2 * 2 * 16)  # layers x (k, v) x groups x kv_channels
    model.train()
    model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = -100
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=labels, loss_only=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    from glmtune.train.checkpoint import capture_rng

    state = {"global_step": 15, "samples_seen": 30, "global_batch_size": 2, "seed": 0, "train_rows": 2}
    ckpt = save_checkpoint(tmp_path, 15, model, None, optimizer, scheduler, [capture_rng()], state)
    assert load_checkpoint_state(ckpt)["state"]["global_step"] == 15  # complete: --resume finds it
    assert latest_checkpoint(tmp_path) == ckpt
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, GLMTUNE_ADAPTER):
        assert (ckpt / name).is_file()
    assert not (ckpt / "config.json").exists()  # a PEFT adapter folder, not the ChatGLM2 layout
    model.eval()
    resumed = load_model(tiny_glm4, ptuning_checkpoint=ckpt, pre_seq_len=8)
    with torch.no_grad():
        assert torch.equal(resumed(ids).logits, model(ids).logits)


@pytest.mark.parametrize("adapter", ["prefix", "prefix-proj"])
def test_merged_glm4_folder_computes_what_base_plus_adapter_computes(reference, tmp_path, adapter):
    root = reference / "golden-model-glm4"
    exp = torch.load(root / "expected.pt", weights_only=True)
    merged = save_model(load_model(root / "model", ptuning_checkpoint=root / adapter), tmp_path / "merged",
                        dtype="bfloat16")
    cfg = json.loads((merged / "config.json").read_text())
    assert (cfg["pre_seq_len"], cfg["glmtune_family"], cfg["rope_ratio"]) == (4, "glm4", 500)
    with torch.no_grad():
        logits = load_model(merged)(exp["input_ids"]).logits
    assert (logits[..., exp["columns"]] - exp[f"{adapter}/logits_cols"]).abs().max() <= TOL
    assert torch.equal(logits.argmax(-1), exp[f"{adapter}/logits_argmax"])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("which", ["golden-model-glm4", "golden-model-glm4-0414"])
def test_quantized_glm4_folder_equals_quantizing_at_load(reference, tmp_path, bits, which):
    src = reference / which / "model"
    out = quantize_checkpoint(src, tmp_path / "q", bits)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_bit"] == bits
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    with torch.no_grad():
        from_folder = load_model(out)(ids).logits
        at_load = load_model(src, quantization_bit=bits)(ids).logits
        full = load_model(src)(ids).logits
    assert torch.equal(from_folder, at_load)
    if bits == 8:  # int8 stays close to full precision (int4 on these random 0.2*randn weights does not)
        assert (from_folder - full).abs().max() < 0.25 * full.std()


def test_glm4_config_of_the_tiny_writer_carries_the_real_stop_list(reference):
    cfg = glm4_config(TinyConfig(), 151552, [151329, 151336, 151338], 151329)
    real = json.loads((reference / "glm-4-9b-chat" / "config.json").read_text())
    for key in ("eos_token_id", "pad_token_id", "rope_ratio", "layernorm_epsilon", "padded_vocab_size", "add_qkv_bias"):
        assert cfg[key] == real[key], key
    state = random_state_dict(TinyConfig(), 151552)
    assert state["transformer.output_layer.weight"].shape == (151552, 64)
    assert callable(write_weights)


def test_init_model_family_glm4_writes_a_tiny_glm4_with_its_own_tokenizer(tmp_path):
    from glmtune.families.tokenizer import load_tokenizer
    from glmtune.model.tiny import init_model

    folder = init_model(tmp_path / "m", family="glm4", vocab_size=600)
    tokenizer = load_tokenizer(folder)
    cfg = json.loads((folder / "config.json").read_text())
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    assert (tokenizer.family, cfg["glmtune_family"], cfg["eos_token_id"]) == ("glm4", "glm4", stops)
    assert cfg["padded_vocab_size"] >= len(tokenizer) and cfg["padded_vocab_size"] % 64 == 0
    model = load_model(folder, pre_seq_len=4)
    assert model.config.rope_parameters["rope_theta"] == 5e6 and model.prefix_encoder.dropout.p == 0.0
    ids = torch.tensor([tokenizer.encode("你好")])
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], cfg["padded_vocab_size"])
