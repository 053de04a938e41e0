"""Issue 9 hardening: each test names the item it covers (the README's Python block, folder guards,
clear errors for bad input, the cache path, import cycles, private names, CI on missing reference data)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from glmtune.errors import GlmtuneError

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "glmtune", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model (short window, so sampled chat stays quick) and a P-tuning checkpoint for it."""
    import torch

    from glmtune.loading import load_model, save_prefix_checkpoint
    from glmtune.tiny import init_model

    root = tmp_path_factory.mktemp("harden")
    model_dir = init_model(root / "chatglm2-6b", seq_length=96)
    torch.manual_seed(0)
    ckpt = root / "out" / "checkpoint-3000"
    ckpt.mkdir(parents=True)
    save_prefix_checkpoint(load_model(model_dir, pre_seq_len=4), ckpt)
    return root, model_dir, ckpt


# --- item 2: the README's Python example runs; public names are what they say -------------------------


def _readme_python_block() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs_on_the_tiny_model(tiny):
    root, _, _ = tiny
    code = _readme_python_block() + "\nprint('RESPONSE', type(response).__name__, len(history))\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RESPONSE str 1" in proc.stdout


def test_every_public_name_is_the_function_whatever_was_imported_first():
    code = ("import importlib, types, glmtune\n"
            "importlib.import_module('glmtune.chat'); importlib.import_module('glmtune.loading')\n"
            "from glmtune import chat, stream_chat, load_model, save_model, load_tokenizer\n"
            "assert all(callable(getattr(glmtune, n)) and not isinstance(getattr(glmtune, n), types.ModuleType)\n"
            "           for n in glmtune.__all__ if n != '__version__'), glmtune.__all__\n"
            "assert chat.__module__ == 'glmtune.chat' and chat.__name__ == 'chat'\n"
            "assert importlib.import_module('glmtune.chat').read_history_file\n"
            "print('OK')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.strip() == "OK", proc.stderr[-2000:]


# --- item 20: CI fails (not skips) when the reference data is missing -----------------------------------


@pytest.mark.parametrize("required, outcome", [("1", "1 error"), ("", "1 skipped")])
def test_missing_reference_data_fails_when_required_and_skips_otherwise(tmp_path, required, outcome):
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text(encoding="utf-8"))
    (tmp_path / "test_uses_reference.py").write_text("def test_x(reference):\n    assert reference.is_dir()\n")
    env = {**os.environ, "GLMTUNE_REFERENCE": str(tmp_path / "absent"), "GLMTUNE_REQUIRE_REFERENCE": required}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert outcome in proc.stdout, proc.stdout[-2000:]
    assert (proc.returncode != 0) == bool(required)


def test_ci_entry_point_requires_the_reference_data():
    assert "export GLMTUNE_REQUIRE_REFERENCE=1" in (REPO / ".ci" / "run").read_text()


# --- item 4: save_model never deletes an existing folder unless asked -----------------------------------


def test_save_model_refuses_an_existing_folder_unless_overwrite(tiny, tmp_path):
    from glmtune.loading import load_model, save_model

    _, model_dir, _ = tiny
    model = load_model(model_dir)
    out = tmp_path / "existing"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(GlmtuneError, match="exists and is not empty"):
        save_model(model, out)
    assert (out / "precious.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(GlmtuneError, match="not a folder"):
        save_model(model, tmp_path / "file")
    save_model(model, out, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "config.json").is_file()


# --- item 7: a shared token-cache entry reports the path given, not the first one tokenized ------------


def test_cached_tokenized_file_reports_the_path_given(tiny, tmp_path):
    from glmtune import data, dataset_store
    from glmtune.tokenizer import load_tokenizer

    _, model_dir, _ = tiny
    tokenizer = load_tokenizer(model_dir)
    rows = "".join(json.dumps({"content": f"类型#裙{i}", "summary": f"好看{i}"}, ensure_ascii=False) + "\n" for i in range(3))
    first, second = tmp_path / "checkout-a" / "train.json", tmp_path / "checkout-b" / "train.json"
    for path in (first, second):
        path.parent.mkdir()
        path.write_text(rows, encoding="utf-8")
    cache = tmp_path / "cache"
    _, report_a = dataset_store.load_or_build_dataset(first, tokenizer, data.DataConfig(), cache_dir=cache)
    _, report_b = dataset_store.load_or_build_dataset(second, tokenizer, data.DataConfig(), cache_dir=cache)
    assert len(list(cache.iterdir())) == 1  # one shared entry
    assert report_a["source"] == str(first) and report_b["source"] == str(second)
    assert data.format_report(report_b).startswith(str(second))
