"""Model families: detection, --family override, the 32k rope rules against official logits, and the family
recorded in checkpoints / merged folders (a checkpoint on a base of another family is refused)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from glmtune.errors import GlmtuneError
from glmtune.families.registry import FAMILIES, FAMILY_FIELD, detect_family, get_family, resolve_family
from glmtune.model.loading import load_model, save_model, save_prefix_checkpoint


@pytest.fixture(scope="module")
def rope(reference):
    return reference / "golden-rope32k", torch.load(reference / "golden-rope32k" / "expected.pt", weights_only=True)


def _logits(model, input_ids, position_ids=None):
    with torch.no_grad():
        return model(input_ids, position_ids=position_ids).logits


@pytest.mark.parametrize(
    "tag, folder, family",
    [("glm2_32k", "chatglm2-6b-32k", None), ("glm3_32k", "chatglm3-6b-32k", "chatglm3")],
)
def test_32k_rope_rules_give_the_official_logits_beyond_the_trained_length(rope, tag, folder, family):
    # chatglm2-6b-32k divides positions by rope_ratio (16), chatglm3-6b-32k multiplies the base by it (50).
    ref, expected = rope
    model = load_model(ref / folder, family=family)
    ids = expected["input_ids"]
    assert torch.allclose(_logits(model, ids), expected[f"{tag}/logits"], atol=1e-4, rtol=0)
    offset = _logits(model, ids, expected["offset_position_ids"])  # positions 30000.., past 8k/2k training
    assert torch.allclose(offset, expected[f"{tag}/logits_offset"], atol=1e-4, rtol=0)
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
    assert greedy.tolist() == expected[f"{tag}/greedy"].tolist()


def test_saving_a_32k_model_writes_the_official_rotary_buffer_and_the_same_logits(rope, tmp_path):
    ref, expected = rope
    model = load_model(ref / "chatglm3-6b-32k", family="chatglm3")
    saved = save_model(model, tmp_path / "copy")
    from safetensors.torch import load_file

    index = json.loads((ref / "chatglm3-6b-32k" / "pytorch_model.bin.index.json").read_text(encoding="utf-8"))
    key = "transformer.rotary_pos_emb.inv_freq"
    official = torch.load(ref / "chatglm3-6b-32k" / index["weight_map"][key], weights_only=True)[key]
    assert torch.equal(load_file(saved / "model.safetensors")[key], official)
    again = load_model(saved)  # the family is recorded: no --family needed any more
    assert torch.allclose(_logits(again, expected["input_ids"]), expected["glm3_32k/logits"], atol=1e-4, rtol=0)


def test_each_32k_folder_under_the_other_rule_gives_other_logits(rope):
    # The two rules really differ: reading chatglm2-6b-32k with the ChatGLM3 rule is wrong (the old bug).
    ref, expected = rope
    wrong = load_model(ref / "chatglm2-6b-32k", family="chatglm3")
    assert not torch.allclose(_logits(wrong, expected["input_ids"]), expected["glm2_32k/logits"], atol=1e-2)


def test_without_rope_ratio_both_families_give_the_plain_logits(rope, tmp_path):
    ref, expected = rope
    for name in ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"):
        (tmp_path / name).symlink_to(ref / "chatglm2-6b-32k" / name)
    cfg = json.loads((ref / "chatglm2-6b-32k" / "config.json").read_text(encoding="utf-8"))
    del cfg["rope_ratio"]
    (tmp_path / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    for family in FAMILIES:
        logits = _logits(load_model(tmp_path, family=family), expected["input_ids"])
        assert torch.allclose(logits, expected["plain/logits"], atol=1e-4, rtol=0), family


def test_family_detection_and_override(reference, tmp_path):
    assert detect_family(reference / "chatglm3-6b").name == "chatglm3"
    assert detect_family(reference / "chatglm2-6b").name == "chatglm2"
    assert detect_family(reference / "golden-model" / "model").name == "chatglm2"  # nothing says otherwise
    assert resolve_family(reference / "chatglm2-6b", "chatglm3").name == "chatglm3"
    with pytest.raises(GlmtuneError, match=r"--family: expected one of \['chatglm2', 'chatglm3', 'glm4'\], found 'glm5'"):
        get_family("glm5")
    # An official ChatGLM3 config.json names its release; no tokenizer_config.json is needed.
    shutil.copy(reference / "chatglm3-6b" / "config.json", tmp_path / "config.json")
    assert detect_family(tmp_path).name == "chatglm3"
    (tmp_path / "config.json").write_text(json.dumps({FAMILY_FIELD: "chatglm3"}), encoding="utf-8")
    assert detect_family(tmp_path).name == "chatglm3"
    (tmp_path / "config.json").write_text(json.dumps({FAMILY_FIELD: "bert"}), encoding="utf-8")
    with pytest.raises(GlmtuneError, match="glmtune_family: expected one of"):
        detect_family(tmp_path)


def test_checkpoints_and_merged_folders_record_the_family_and_a_mismatch_is_refused(reference, tmp_path):
    glm3_base = reference / "golden-model-glm3" / "model"
    model = load_model(glm3_base, pre_seq_len=4, family="chatglm3")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_prefix_checkpoint(model, ckpt)
    assert json.loads((ckpt / "config.json").read_text(encoding="utf-8"))[FAMILY_FIELD] == "chatglm3"
    merged = save_model(model, tmp_path / "merged")
    assert json.loads((merged / "config.json").read_text(encoding="utf-8"))[FAMILY_FIELD] == "chatglm3"
    assert detect_family(merged).name == "chatglm3"
    # The same base read as ChatGLM2 (the prefix shapes match): refused, naming both families.
    with pytest.raises(GlmtuneError, match="checkpoint of a chatglm3 model, but the base model is chatglm2"):
        load_model(glm3_base, ptuning_checkpoint=ckpt)
    assert load_model(glm3_base, ptuning_checkpoint=ckpt, family="chatglm3").pre_seq_len == 4
    # Official checkpoints record no family: accepted on either base.
    assert load_model(reference / "golden-model" / "model", ptuning_checkpoint=reference / "golden-model" / "ptuning").pre_seq_len == 4
    shutil.rmtree(ckpt)
