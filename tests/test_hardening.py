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

    from glmtune.model.loading import load_model, save_prefix_checkpoint
    from glmtune.model.tiny import init_model

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
            "importlib.import_module('glmtune.inference.chat'); importlib.import_module('glmtune.model.loading')\n"
            "from glmtune import chat, stream_chat, load_model, save_model, load_tokenizer\n"
            "assert all(callable(getattr(glmtune, n)) and not isinstance(getattr(glmtune, n), types.ModuleType)\n"
            "           for n in glmtune.__all__ if n != '__version__'), glmtune.__all__\n"
            "assert chat.__module__ == 'glmtune.inference.chat' and chat.__name__ == 'chat'\n"
            "assert importlib.import_module('glmtune.inference.chat').read_history_file\n"
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
    from glmtune.model.loading import load_model, save_model

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
    from glmtune.data import preprocess as data
    from glmtune.data import store as dataset_store
    from glmtune.families.tokenizer import load_tokenizer

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


# --- item 8: one clear error (file, line, field) instead of a traceback ---------------------------------


@pytest.mark.parametrize("name, text, message", [
    ("ragged.csv", "content,summary\na,b\nc,d,e\n", r"ragged.csv:3: 3 fields, but the header has 2"),
    ("quote.csv", 'content,summary\na,b\n"c,d\ne,f\n', r"quote.csv:3: malformed CSV .*a quoted field is never closed"),
    ("trunc.jsonl", '{"content": "a", "summary": "b"}\n{"content": "abc", "summary": \n',
     r"trunc.jsonl:2: not valid JSON \(Expecting value at column 31\)"),
    ("crlf.jsonl", '{"content": "a", "summary": "b"}\r\n{"content": "ab",\r\n', r"crlf.jsonl:2: .* at column 18\)"),
])
def test_malformed_data_files_name_the_line_and_the_right_column(tmp_path, name, text, message):
    from glmtune.data import preprocess as data

    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    with pytest.raises(GlmtuneError, match=message):
        data.load_rows(path)


def test_short_csv_rows_and_blank_lines_are_read_as_pandas_would(tmp_path):
    from glmtune.data import preprocess as data

    path = tmp_path / "ok.csv"
    path.write_text('content,summary\n"a, with comma",b\n\nc\n"multi\nline",d\n', encoding="utf-8")
    rows = data.load_rows(path)
    assert [(r["prompt"], r["response"]) for r in rows] == [("a, with comma", "b"), ("c", None), ("multi\nline", "d")]


def test_score_on_a_non_utf8_file_exits_2_naming_the_line(tmp_path):
    path = tmp_path / "generated_predictions.txt"
    path.write_bytes('{"labels": "好", "predict": "好"}\n'.encode() + '{"labels": "好", "predict": "x"}\n'.encode("gbk"))
    proc = _cli("score", path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {path}:2: not UTF-8 text" in proc.stderr
    assert not list(tmp_path.glob("*.scores.json"))


@pytest.mark.parametrize("field, value, expected", [
    ("num_layers", "two", "field num_layers: expected a positive integer, found 'two'"),
    ("hidden_size", -64, "field hidden_size: expected a positive integer, found -64"),
    ("kv_channels", 0, "field kv_channels: expected a positive integer, found 0"),
    ("multi_query_attention", "yes", "field multi_query_attention: expected true or false, found 'yes'"),
    ("num_attention_heads", True, "field num_attention_heads: expected a positive integer, found True"),
])
def test_model_config_with_a_wrong_type_or_negative_size_is_one_clear_error(tiny, tmp_path, field, value, expected):
    import shutil

    _, model_dir, _ = tiny
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    if field != "num_layers":
        from glmtune.model.loading import load_model

        with pytest.raises(GlmtuneError) as caught:
            load_model(folder)
        assert str(caught.value) == f"{folder / 'config.json'}: {expected}"
        return
    proc = _cli("chat", "--model-path", folder, "--query", "你好", "--device", "cpu")  # once through the CLI
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert f"{folder / 'config.json'}: {expected}" in proc.stderr


# --- item 10: eval says how many rows it dropped and why -----------------------------------------------


def test_eval_says_how_many_rows_were_dropped_as_empty_and_why(tiny, tmp_path):
    _, model_dir, _ = tiny
    rows = [{"content": f"类型#裙*颜色#{c}", "summary": "好看"} for c in "红黄蓝"]
    rows += [{"content": "类型#裤", "summary": ""}, {"content": "", "summary": "好看"}]
    test_file = tmp_path / "dev.json"
    test_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    from typer.testing import CliRunner

    from glmtune.cli import app

    result = CliRunner().invoke(app, ["eval", "--model-path", str(model_dir), "--test-file", str(test_file),
                                      "--output-dir", str(tmp_path / "eval"), "--max-new-tokens", "2", "--device", "cpu",
                                      "--no-progress"], env={"GLMTUNE_CACHE": str(tmp_path / "cache")})
    assert result.exit_code == 0, result.output
    assert ("note: 2 of 5 rows dropped (1 with an empty response, 1 with an empty prompt): the official "
            "preprocessing skips rows without a prompt or a reference; 3 evaluated") in result.stderr


def test_dropped_rows_message_on_a_preprocessed_folder_cut_by_max_samples():
    from glmtune.evaluation.generate import dropped_rows_message

    assert dropped_rows_message({"empty_prompt": 0, "empty_response": 0, "total": 0}, 20) is None
    assert dropped_rows_message({"empty_prompt": None, "empty_response": None, "total": 1}, 19).startswith(
        "1 of 20 rows dropped (empty prompt or response)")


# --- item 12 (first half): a merged model given another checkpoint warns --------------------------------


def test_merged_model_given_another_ptuning_checkpoint_warns_that_it_replaces_the_prefix(tiny, tmp_path, caplog):
    from glmtune.model.loading import load_model
    from glmtune.model.merge import merge_checkpoint

    _, model_dir, ckpt = tiny
    merged = merge_checkpoint(model_dir, ckpt, tmp_path / "merged").output_dir
    with caplog.at_level("WARNING", logger="glmtune.model.loading"):
        load_model(merged)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="glmtune.model.loading"):
        load_model(merged, ptuning_checkpoint=ckpt)
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: {merged} is a merged model with its own prefix (pre_seq_len 4); --ptuning-checkpoint {ckpt} replaces it"]


# --- items 13, 14: help text a person can read; one set of spellings; --version -------------------------


def _commands():
    import typer.main

    from glmtune.cli import app

    return typer.main.get_command(app).commands


def _effective_default(command_name: str, param):
    """The value an option takes when not given; for train, the TrainConfig default behind its None."""
    if param.default is not None or command_name != "train":
        return param.default
    import dataclasses

    from glmtune.train.config import TrainConfig

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return fields.get(param.name)


def test_every_commands_help_keeps_square_brackets_and_shows_each_default():
    from typer.testing import CliRunner

    from glmtune.cli import app

    for name, command in _commands().items():
        result = CliRunner().invoke(app, [name, "--help"], terminal_width=200, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.split())
        assert "<bool>" not in text  # plain flags take no value, so help must not suggest one
        for param in command.params:
            if param.param_type_name != "option" or param.name == "help" or param.hidden:
                continue
            record = param.get_help_record(command.make_context(name, [], resilient_parsing=True))
            shown = " ".join(" ".join(record).split())
            assert shown.split("  ")[0].split(" <")[0].split(",")[0] in text
            default = _effective_default(name, param)
            flag_off = getattr(param, "is_flag", False) and default is False and not param.secondary_opts
            if default is not None and default != "" and not flag_off and not param.required:
                assert "default:" in shown, f"glmtune {name} {param.opts[0]}: default {default!r} not shown: {shown}"
                assert f"[default: {shown.split('[default: ')[1]}" in text, f"{name} {param.opts[0]}: lost in rendering"


def test_train_help_keeps_bracketed_text():
    proc = _cli("train", "--help", env={**os.environ, "COLUMNS": "200"})
    text = " ".join(proc.stdout.split())
    assert "Prefix length [default: 128]" in text and "Column of [query, answer] pairs" in text


def test_every_kebab_flag_is_also_accepted_in_snake_case_on_every_command():
    for name, command in _commands().items():
        names = {opt for p in command.params for opt in (*p.opts, *getattr(p, "secondary_opts", []))}
        for opt in names:
            if opt.startswith("--") and "-" in opt[2:]:
                assert "--" + opt[2:].replace("-", "_") in names, f"glmtune {name}: {opt} has no snake_case spelling"


def test_chat_merge_quantize_accept_model_path_in_snake_case(tmp_path):
    extra = {"chat": ["--query", "hi"], "merge": ["--ptuning_checkpoint", tmp_path, "--output_dir", tmp_path / "o"],
             "quantize": ["--bits", 4, "--output_dir", tmp_path / "o"]}
    from typer.testing import CliRunner

    from glmtune.cli import app

    for command, args in extra.items():
        result = CliRunner().invoke(app, [command, "--model_path", str(tmp_path / "absent"), *map(str, args)])
        # parsed: the command ran and failed on the missing folder, not on the flag
        assert isinstance(result.exception, GlmtuneError) and "absent" in str(result.exception), result.output


def test_version_flag_prints_the_version():
    from glmtune import __version__

    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"glmtune {__version__}"


def test_plain_flags_reject_a_value_with_a_clear_usage_error(tmp_path):
    proc = _cli("eval", "--model-path", tmp_path, "--output-dir", tmp_path, "--official-truncation", "true")
    assert proc.returncode == 2 and "unexpected extra argument(s) (true)" in proc.stderr


# --- item 15 (parts): the length table's columns; CHECKPOINT means one thing in the shell scripts ------


def test_length_table_columns_stay_apart_at_six_and_more_digits():
    from glmtune.data import preprocess as data

    report = {"source": "x.json", "mode": "train", "rows_read": 3, "rows_kept": 3,
              "rows_skipped": {"total": 0, "empty_prompt": 0, "empty_response": 0},
              "prompt_tokens": {"p50": 123456.0, "p90": 1234567.5, "p99": 99.0, "max": 12345678},
              "target_tokens": {"p50": 1.0, "p90": 2.0, "p99": 3.0, "max": 4},
              "max_source_length": 64, "max_target_length": 1000000, "prompts_truncated": 1234567,
              "prompts_truncated_pct": 100.0, "targets_truncated": 0, "targets_truncated_pct": 0.0}
    header, prompt, target = data.format_report(report).splitlines()[1:]
    assert header.split() == ["tokens", "p50", "p90", "p99", "max", "limit", "cut", "cut", "%"]
    assert prompt.split() == ["prompt", "123456.0", "1234567.5", "99.0", "12345678", "64", "1234567", "100.0"]
    assert target.split()[5] == "1000000"
    assert len({len(header), len(prompt), len(target)}) == 1  # columns line up


@pytest.mark.parametrize("env, expected", [
    ({}, "output/adgen-chatglm2-6b-pt-128-2e-2/checkpoint-3000"),
    ({"CHECKPOINT": "my-run", "STEP": "500"}, "output/my-run/checkpoint-500"),
    ({"PTUNING_CHECKPOINT": "elsewhere/checkpoint-7"}, "elsewhere/checkpoint-7"),
])
def test_evaluate_and_chat_scripts_read_checkpoint_and_step_the_same_way(tmp_path, env, expected):
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    for script in ("evaluate.sh", "chat.sh"):
        proc = subprocess.run(["bash", str(REPO / "shell" / script)], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHON": str(fake), **env})
        args = proc.stdout.splitlines()
        assert proc.returncode == 0, proc.stderr
        assert args[args.index("--ptuning-checkpoint") + 1] == expected, script


# --- item 17: no import cycles inside glmtune/ (top-level or deferred imports alike) ---------------------


def _import_graph() -> dict[str, set[str]]:
    """Module -> the glmtune modules it imports (dotted names below glmtune, packages by their __init__)."""
    import ast

    package = REPO / "glmtune"

    def dotted(path: Path) -> str:
        parts = path.relative_to(package).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {dotted(p) for p in package.rglob("*.py")}

    def targets(module: str, names=()) -> set[str]:
        found = {module} if module in modules else set()
        return found | {f"{module}.{n}".lstrip(".") for n in names if f"{module}.{n}".lstrip(".") in modules}

    graph = {}
    for path in package.rglob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module == "glmtune" or (node.module or "").startswith("glmtune.")):
                deps |= targets(node.module[len("glmtune."):] if node.module != "glmtune" else "", [a.name for a in node.names])
            elif isinstance(node, ast.Import):
                deps |= set().union(*(targets(a.name[len("glmtune."):]) for a in node.names if a.name.startswith("glmtune.")))
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args \
                    and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("glmtune."):
                deps |= targets(node.args[0].value[len("glmtune."):])
        graph[dotted(path)] = deps - {dotted(path), ""}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_glmtune_modules_import_each_other_without_cycles():
    graph = _import_graph()
    assert graph["model.quantization"] and graph["model.merge"]  # the graph was really read
    # No cycle at all, top-level or deferred: a family package imports only `glmtune.families.family` (the record and
    # register()) and its own modules; the registry imports the family packages; commands and the data reader ask the
    # registry (what glmtune.data.preprocess and glmtune.families.chatglm3.data share is in glmtune.data.formats / fsutil).
    assert _cycles(graph) == [], _cycles(graph)
    assert {"families.chatglm2", "families.chatglm3", "families.family"} <= graph["families.registry"]
    assert "families.registry" in graph["families.tokenizer"] and "families.registry" in graph["data.preprocess"]
    assert {"families.chatglm3.data", "families.chatglm3.chat", "families.family"} <= graph["families.chatglm3"]
    assert not any(dep.startswith("families.registry") for pkg in ("chatglm2", "chatglm3", "glm4")
                   for mod, deps in graph.items() if mod.startswith(f"families.{pkg}") for dep in deps)


# --- item 18 (parts): one definition each; no dead code or unused dependency; one atomic-write helper ----


def _module_constants() -> dict[str, list[str]]:
    import ast
    from collections import defaultdict

    found = defaultdict(list)
    for path in (REPO / "glmtune").rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                if isinstance(target, ast.Name) and target.id.isupper():
                    found[target.id].append(path.stem)
    return found


def test_ignore_index_and_modes_are_each_defined_once():
    from glmtune.data import preprocess as data
    from glmtune.model import modeling

    constants = _module_constants()
    assert len(constants["IGNORE_INDEX"]) == 1 and modeling.IGNORE_INDEX == data.IGNORE_INDEX == -100
    assert len(constants.get("MODES", [])) <= 1  # quantized compute modes only; data's are TOKENIZE_MODES
    assert data.TOKENIZE_MODES == ("train", "eval")


def test_removed_dead_code_stays_removed():
    import inspect

    from glmtune.data import preprocess as data

    # (`_prefix_kv` and the dtype fallback came back with the serve work's forward split on main: `compute_dtype`
    # documents why, and `_prepare_cache` calls `_prefix_kv`; that code is the serve developer's.)
    assert list(inspect.signature(data.collate_train).parameters) == ["features", "pad_token_id"]
    assert "1e-5" not in (REPO / "glmtune" / "model" / "quantization.py").read_text().split('"""')[1]


def test_every_declared_dependency_is_imported_somewhere():
    sources = "\n".join(p.read_text(encoding="utf-8") for d in ("glmtune", "bench", "tests")
                        for p in (REPO / d).rglob("*.py") if p.name != Path(__file__).name)
    assert "psutil" not in (REPO / "requirements.txt").read_text() and "psutil" not in (REPO / "setup.cfg").read_text()
    assert "import psutil" not in sources


def test_my_modules_write_files_through_fsutil_only():
    for name in ("data/store", "evaluation/metrics", "evaluation/generate", "data/preprocess", "model/merge", "model/loading"):
        text = (REPO / "glmtune" / f"{name}.py").read_text(encoding="utf-8")
        assert "os.replace(" not in text and ".tmp" not in text, name


def test_dataset_folder_written_by_preprocess_gets_umask_modes_and_leaves_no_temp(tiny, tmp_path):
    from glmtune.data import preprocess as data
    from glmtune.data import store as dataset_store
    from glmtune.families.tokenizer import load_tokenizer

    source = tmp_path / "train.json"
    source.write_text(json.dumps({"content": "类型#裙", "summary": "好看"}, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "ds"
    dataset_store.preprocess(source, load_tokenizer(tiny[1]), out, data.DataConfig())
    dataset_store.preprocess(source, load_tokenizer(tiny[1]), out, data.DataConfig())  # replaces its own folder
    assert sorted(p.name for p in out.parent.iterdir()) == ["ds"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out / dataset_store.META_FILE).stat().st_mode & 0o777 == 0o666 & ~umask


# --- item 3 (harden part): private names go through glmtune.compat, which checks they still exist -------

PRIVATE = re.compile(r"\b(_attn_implementation|_can_checkpoint_with_cache|_parameters|_buffers|_added_tokens_\w+|"
                     r"_encode_plus|_weight_int[48]pack\w*|_convert_weight_to_int4pack\w*|_linear_pointwise)\b")
OWNERS_ROUTE_THEMSELVES = {"families/chatglm2/tokenizer.py", "model/qkernels.py"}  # their owners move these names


def test_every_private_name_glmtune_relies_on_exists_in_the_installed_versions():
    from glmtune import compat

    assert compat.missing_private_names() == []
    assert compat.checkpointing_layer_reads_cache_flag()


def _code_names(path: Path) -> list[str]:
    """Identifiers in code (not in docstrings or comments) and attribute names in string literals used by code."""
    import io
    import tokenize

    tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    return [t.string for t in tokens if t.type == tokenize.NAME]


def test_private_transformers_and_torch_names_appear_only_in_compat():
    package = REPO / "glmtune"
    offenders = {p.relative_to(package).as_posix(): [n for n in _code_names(p) if PRIVATE.fullmatch(n)]
                 for p in package.rglob("*.py")
                 if p.relative_to(package).as_posix() not in OWNERS_ROUTE_THEMSELVES | {"compat.py"}}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_private_name_detector_sees_code_but_not_docstrings(tmp_path):
    planted = tmp_path / "m.py"
    planted.write_text('"""uses `aten._weight_int4pack_mm_for_cpu`"""\nlayer._can_checkpoint_with_cache = True\n')
    assert [n for n in _code_names(planted) if PRIVATE.fullmatch(n)] == ["_can_checkpoint_with_cache"]


def test_compat_refuses_a_layer_without_the_flag_instead_of_dropping_the_prefix():
    from torch import nn

    from glmtune import compat

    with pytest.raises(RuntimeError, match="would drop the P-tuning prefix"):
        compat.allow_checkpointing_with_cache(nn.Linear(2, 2))


# --- item 5: a non-editable install works on its own (the bundled data ships inside the package) --------


def test_non_editable_install_in_a_fresh_venv_runs_init_model_outside_the_repo(tmp_path):
    import shutil

    source = tmp_path / "src"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "runs", "*.egg-info", "__pycache__", ".venv*", ".pytest_cache"))
    venv = tmp_path / "venv"
    # --system-site-packages: torch & co come from this machine; --without-pip: this Python's own pip and
    # setuptools build the wheel offline (a venv's bundled setuptools may be too old to build wheels).
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(source)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shutil.rmtree(source)  # nothing may still come from the source tree
    where = subprocess.run([str(python), "-c", "import glmtune; print(glmtune.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path).stdout.strip()
    assert where.startswith(str(venv)), where
    proc = subprocess.run([str(venv / "bin" / "glmtune"), "init-model", str(tmp_path / "model")], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "model" / "tokenizer.model").is_file()


# --- item 16: init-model can pre-train the tiny base (seeded), so the demo shows what the prefix learns ---


def test_init_model_pretraining_lowers_the_loss_changes_the_weights_and_is_seeded(tiny, tmp_path):
    import torch
    from safetensors.torch import load_file

    from glmtune.model.tiny import init_model

    runs = []
    for name in ("a", "b"):
        losses = []
        out = init_model(tmp_path / name, pretrain_steps=30, on_pretrained=losses.extend)
        runs.append((load_file(str(out / "model.safetensors")), losses))
    random_weights = load_file(str(tiny[1] / "model.safetensors"))  # the same seed, not pre-trained
    (a, losses_a), (b, losses_b) = runs
    assert len(losses_a) == 30 and sum(losses_a[-5:]) / 5 < losses_a[0] - 1.0
    assert losses_a == losses_b and all(torch.equal(a[k], b[k]) for k in a)  # seeded: the same base twice
    key = "transformer.output_layer.weight"
    assert set(a) == set(random_weights) and not torch.equal(a[key], random_weights[key])


def test_init_model_rejects_a_negative_pretrain_steps(tmp_path):
    from glmtune.model.tiny import init_model

    with pytest.raises(GlmtuneError, match="--pretrain-steps must be 0 or a positive integer"):
        init_model(tmp_path / "m", pretrain_steps=-1)


def test_history_and_tools_files_that_are_not_utf8_or_not_json_are_one_clear_error(tmp_path):
    from glmtune.inference.chat import read_history_file, read_tools_file

    latin = tmp_path / "latin1.json"
    latin.write_bytes('[["caf\u00e9", "ok"]]'.encode("latin-1"))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"name": "x",\n', encoding="utf-8")
    for reader in (read_history_file, read_tools_file):
        with pytest.raises(GlmtuneError, match=r"latin1\.json: not UTF-8 text"):
            reader(latin)
        with pytest.raises(GlmtuneError, match=r"broken\.json: line 2: invalid JSON"):
            reader(broken)
        with pytest.raises(GlmtuneError, match="not found"):
            reader(tmp_path / "missing.json")
