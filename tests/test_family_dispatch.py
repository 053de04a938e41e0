"""What differs between model families is asked of the registry (`glmtune.families.registry`), never decided in the commands:
a static check of the command modules, and a made-up third family that goes through chat and serving
without any command knowing its name."""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessor

from glmtune.families.registry import CHATGLM2, FAMILIES, family_of, get_family
from glmtune.families.tokenizer import load_tokenizer

PACKAGE = Path(__file__).resolve().parents[1] / "glmtune"
COMMAND_MODULES = ["inference/chat.py", "repl.py", "cli.py", "evaluation/generate.py", "train/loop.py", "model/merge.py",
                   *sorted(p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "serve").glob("*.py"))]
FAMILY_NAMES = {"chatglm2", "chatglm3"}
# a family's own implementation (a package under glmtune/families/), reached through the registry only
FAMILY_PACKAGES = {p.name for p in (PACKAGE / "families").iterdir() if (p / "__init__.py").is_file()}
FAMILY_MODULES = {"glm2", "glm3", *FAMILY_PACKAGES}


def _is_family_module(dotted: str) -> bool:
    parts = dotted.split(".")
    return parts[:2] == ["glmtune", "families"] and len(parts) > 2 and parts[2] in FAMILY_PACKAGES


def _docstrings(tree: ast.AST) -> set[int]:
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return {id(n.body[0].value) for n in nodes if n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant) and isinstance(n.body[0].value.value, str)}


def family_branches(source: str) -> list[str]:
    """Places in `source` that decide something by the family's name or by reaching into a family's module."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Name) and node.id == "is_glm3" or isinstance(node, ast.Attribute) and node.attr == "is_glm3":
            found.append(f"{where}: is_glm3")
        elif isinstance(node, ast.Constant) and node.value in FAMILY_NAMES and id(node) not in docs:
            found.append(f"{where}: the literal {node.value!r}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in FAMILY_MODULES:
            found.append(f"{where}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Attribute) and node.attr == "role_tokens":
            found.append(f"{where}: .role_tokens")
        elif isinstance(node, ast.ImportFrom) and (_is_family_module(node.module or "") or node.module == "glmtune.families"
                                                   and {a.name for a in node.names} & FAMILY_PACKAGES):
            found.append(f"{where}: imports a family module")
        elif isinstance(node, ast.Import) and any(_is_family_module(a.name) for a in node.names):
            found.append(f"{where}: imports a family module")
        elif isinstance(node, ast.Compare):
            # `family.name == x`, `tokenizer.family != x`: a name comparison, whatever it is compared with.
            for side in (node.left, *node.comparators):
                text = ast.unparse(side)
                if isinstance(side, ast.Attribute) and (side.attr == "family" or
                                                        side.attr == "name" and "family" in text.lower()):
                    found.append(f"{where}: compares {text}")
    return found


def test_the_family_branch_detector_finds_each_kind_of_branch():
    # The check below would pass vacuously if the detector found nothing: it must flag each pattern it names.
    for snippet in ['if chat_lib.is_glm3(tok):\n    pass', 'if is_glm3(tok): pass', 'x = "chatglm3"',
                    'glm3.system_messages(t)', 'from glmtune.families import chatglm3', 'import glmtune.families.chatglm3.chat',
                        'from glmtune.families.chatglm2.tokenizer import build_prompt',
                    'if tokenizer.family == x: pass', 'if model_family.name != "chatglm2": pass',
                    'if tok.role_tokens: pass']:
        assert family_branches(snippet), snippet
    assert family_branches('"""Works for chatglm3."""\nx = family.chat_prompt(tok, q, h)') == []
    assert family_branches('def f():\n    """chatglm2"""\n    return "chatglm2 or chatglm3"') == []


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_command_modules_never_branch_on_the_model_family(module):
    assert family_branches((PACKAGE / module).read_text(encoding="utf-8")) == []


# --- a third family, registered here only ----------------------------------------------------------

EOP_FAMILY = dataclasses.replace(CHATGLM2, name="chatglm2-eop", title="ChatGLM2 rules, stops on eop too",
                                 stop_tokens=("eop",))


@pytest.fixture
def eop_family(monkeypatch):
    monkeypatch.setitem(FAMILIES, EOP_FAMILY.name, EOP_FAMILY)
    return EOP_FAMILY


class _ThenEop(LogitsProcessor):
    """Greedy picks `token` at every step, except `eop` at the second: only a family that stops on eop stops there."""

    def __init__(self, prompt_len: int, token: int, eop: int) -> None:
        self.prompt_len, self.token, self.eop = prompt_len, token, eop

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -1e9)
        forced[:, self.eop if input_ids.shape[1] - self.prompt_len == 1 else self.token] = 0
        return forced


def test_a_registered_family_chats_with_its_own_stop_token_and_no_command_knows_its_name(tiny_model, eop_family):
    from glmtune.inference import chat as chat_module
    from glmtune.model.loading import load_model

    model = load_model(tiny_model)
    glm2_tok = load_tokenizer(tiny_model)
    tok = load_tokenizer(tiny_model, family=eop_family.name)
    assert family_of(tok) is eop_family and get_family(eop_family.name) is eop_family
    history = [("你好", "你好！")]
    prompt = chat_module.build_chat_prompt(tok, "再见", history, window=256, answer_room=16)
    assert prompt.input_ids == glm2_tok(glm2_tok.build_prompt("再见", history))["input_ids"]  # ChatGLM2's prompt
    eop, token = tok.get_command("eop"), 10  # 10: an ordinary piece
    assert chat_module.stop_token_ids(tok) == [tok.eos_token_id, eop]

    def streamed(tokenizer):
        force = _ThenEop(len(prompt.input_ids), token, eop)
        return list(chat_module.stream_chat(model, tokenizer, "再见", history, do_sample=False, max_new_tokens=6,
                                            logits_processor=[force]))

    # ChatGLM2 rules (one yield per token, history in rounds); only the stop token differs.
    assert len(streamed(tok)) == 2 and len(streamed(glm2_tok)) == 6
    response, new_history = chat_module.chat(model, tok, "再见", history, do_sample=False, max_new_tokens=6,
                                             logits_processor=[_ThenEop(len(prompt.input_ids), token, eop)])
    assert new_history == history + [("再见", response)]


def test_serving_a_registered_family_builds_its_prompt_and_stops_on_its_tokens(tiny_model, eop_family):
    pytest.importorskip("fastapi")
    from glmtune.model.loading import load_model
    from glmtune.serve.models import stop_token_ids
    from glmtune.serve.protocol import ApiError, ChatRequest, chat_prompt_ids

    tok = load_tokenizer(tiny_model, family=eop_family.name)
    glm2_tok = load_tokenizer(tiny_model)
    req = ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "再见"}]})
    assert chat_prompt_ids(tok, req, window=256, max_tokens_cap=16) == chat_prompt_ids(glm2_tok, req, 256, 16)
    assert tok.get_command("eop") in stop_token_ids(load_model(tiny_model), tok)
    with_tools = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                             "tools": [{"type": "function", "function": {"name": "f"}}]})
    with pytest.raises(ApiError, match="no tool format"):  # ChatGLM2's rules: no tools
        chat_prompt_ids(tok, with_tools, 256, 16)
