"""The `glmtune` command line: a thin Typer layer over the library functions.

Every command imports its module lazily, so `glmtune --help` starts without importing torch.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from glmtune.errors import GlmtuneError
from glmtune.families.registry import DEFAULT_FAMILY, FAMILIES  # light (no torch): family packages import their tokenizers lazily
from glmtune.inference import sampling  # constants only

FAMILY_HELP = f"Model family ({', '.join(FAMILIES)}); default: detected from the model folder."


def add_official_spellings(command) -> None:
    """Accept every long kebab-case flag also in the official snake_case spelling (`--model-path` and
    `--model_path`, `--no-progress` and `--no_progress`), on every command, including ones added later.

    Done once here rather than by listing both names on each option, so no command can miss one.
    """
    taken = {opt for param in command.params for opt in (*param.opts, *getattr(param, "secondary_opts", []))}
    for param in command.params:
        if param.param_type_name != "option":  # (typer bundles its own click: no isinstance check)
            continue
        for names in (param.opts, param.secondary_opts):
            for opt in list(names):
                snake = "--" + opt[2:].replace("-", "_")
                if opt.startswith("--") and snake != opt and snake not in taken:
                    names.append(snake)
                    taken.add(snake)


def config_options(*only: str):
    """Give a command one option per `glmtune train` setting (or the settings named in `only`), built from
    TrainConfig (glmtune.train.config), where each setting's name, help, default and official spellings are
    written once; the command receives them as `settings`, a dict in which None means "not given" (so a
    --config file, or the TrainConfig default, fills it)."""
    import functools
    import inspect

    from glmtune.train.config import setting_specs  # no torch import there

    def decorate(command_function):
        signature = inspect.signature(command_function)
        params = [p for p in signature.parameters.values() if p.name != "settings"]
        names = []
        for name, kind, text, flags, switch, shown in setting_specs():
            if only and name not in only:
                continue
            decls = [f"{flags[0]}/--no-{flags[0][2:]}", *flags[1:]] if switch else list(flags)
            option = typer.Option(None, *decls, help=f"{text} [default: {shown}]" if shown else text, show_default=False)
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind]))
            names.append(name)

        @functools.wraps(command_function)
        def command(**kwargs):
            settings = {name: kwargs.pop(name) for name in names}
            return command_function(settings=settings, **kwargs)

        command.__signature__ = signature.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def _given(settings: dict) -> dict:
    return {name: value for name, value in settings.items() if value is not None}


class _Group(TyperGroup):
    def __init__(self, *args, commands=None, **kwargs):
        super().__init__(*args, commands=commands, **kwargs)
        for command in self.commands.values():
            add_official_spellings(command)


app = typer.Typer(
    cls=_Group,
    help="Fine-tune ChatGLM2 / ChatGLM3 with P-tuning v2: preprocess, train, eval, chat, merge, quantize, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help text: Rich markup would eat every "[...]" (defaults, "[query, answer] pairs", "[gMASK]").
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from glmtune import __version__

        typer.echo(f"glmtune {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the glmtune version and exit."),
) -> None:
    """Fine-tune ChatGLM2-6B with P-tuning v2: preprocess, train, eval, chat, merge."""


# --- init-model (tiny) ---
@app.command("init-model")
def init_model_command(
    out_dir: Path = typer.Argument(..., help="Folder to create (official ChatGLM2 layout)."),
    layers: int = typer.Option(2, help="Transformer layers."),
    hidden_size: int = typer.Option(64, help="Hidden size."),
    heads: int = typer.Option(4, help="Attention heads."),
    kv_channels: int = typer.Option(16, help="Head dimension (multiple of 4)."),
    groups: int = typer.Option(2, help="Key/value groups (multi_query_group_num)."),
    ffn_hidden_size: int = typer.Option(160, help="MLP hidden size."),
    seq_length: int = typer.Option(2048, help="seq_length in config.json."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    vocab_size: int = typer.Option(2000, help="Upper bound on SentencePiece pieces."),
    text_file: Optional[list[Path]] = typer.Option(
        None, help="Tokenizer training text (repeatable; JSON lines use their string values). Default: bundled data."
    ),
    weights_format: str = typer.Option("safetensors", "--format", help="Weights format: safetensors or bin."),
    shards: int = typer.Option(1, help="Number of weight shards (>1 writes an index json)."),
    overwrite: bool = typer.Option(False, help="Replace an existing non-empty OUT_DIR."),
    pretrain_steps: int = typer.Option(0, min=0, help="Language-model pre-training steps on the answer texts (bundled data, or --text-file), so the base writes sample-like text; 0 keeps the random base."),
    family: str = typer.Option(DEFAULT_FAMILY.name, "--family", help="Model family: chatglm2 or chatglm3 (role tokens in the tokenizer)."),
) -> None:
    """Write a tiny random ChatGLM2 or ChatGLM3 model (config, weights, tokenizer) for tests and CPU demos."""
    import json

    from glmtune.model.tiny import init_model, read_text_file

    texts = [t for f in text_file for t in read_text_file(f)] if text_file else None
    out = init_model(
        out_dir, layers=layers, hidden_size=hidden_size, heads=heads, kv_channels=kv_channels, groups=groups,
        ffn_hidden_size=ffn_hidden_size, seq_length=seq_length, seed=seed, texts=texts, vocab_size=vocab_size,
        weights_format=weights_format, shards=shards, overwrite=overwrite, pretrain_steps=pretrain_steps,
        family=family,
        on_pretrained=lambda losses: print(f"pre-trained the base for {len(losses)} steps: loss {losses[0]:.3f} -> "
                                           f"{sum(losses[-10:]) / len(losses[-10:]):.3f} (mean of the last 10)"),
    )
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    print(f"wrote {out}: {config['num_layers']} layers, hidden {config['hidden_size']}, "
          f"padded vocab {config['padded_vocab_size']}")
    for path in sorted(out.iterdir()):
        print(f"  {path.name:40s} {path.stat().st_size:>12,d} bytes")


# --- preprocess / train (data, train) ---


# The data settings `preprocess` shares with `train` (TrainConfig holds their defaults and help); `eval` takes the
# columns and lengths, and ignores them for a preprocessed --dataset.
EVAL_DATA_SETTINGS = ("prompt_column", "response_column", "history_column", "source_prefix", "max_source_length",
                      "max_target_length")
PREPROCESS_SETTINGS = (*EVAL_DATA_SETTINGS, "max_seq_length", "chatglm3_rules", "combine", "data_format", "train_on",
                       "family")


@app.command()
@config_options(*PREPROCESS_SETTINGS)
def preprocess(
    model_path: Path = typer.Option(..., "--model-path", "--model_name_or_path", help="Model folder holding tokenizer.model."),
    output_dir: Path = typer.Option(..., "--output-dir", help="Folder for the tokenized dataset and its report."),
    train_file: Optional[Path] = typer.Option(None, "--train-file", help="Raw data (.json/.jsonl/.csv) to tokenize for training."),
    validation_file: Optional[Path] = typer.Option(None, "--validation-file", help="Raw data to tokenize for eval."),
    test_file: Optional[Path] = typer.Option(None, "--test-file", help="Raw data to tokenize for eval/predict."),
    mode: Optional[str] = typer.Option(None, "--mode", help="train or eval (default: train for --train-file, else eval)."),
    max_samples: Optional[int] = typer.Option(
        None, "--max-samples", "--max_train_samples", "--max_eval_samples", "--max_predict_samples", help="Keep the first N rows."
    ),
    num_workers: int = typer.Option(1, "--num-workers", "--preprocessing_num_workers", min=1),
    *,
    settings: dict,  # the PREPROCESS_SETTINGS (config_options)
) -> None:
    """Tokenize a data file as the official P-tuning scripts do; save an Arrow dataset and a length report."""
    from glmtune.data import preprocess as data
    from glmtune.data import store as dataset_store
    from glmtune.families.tokenizer import load_tokenizer

    given = {name: path for name, path in (("train", train_file), ("validation", validation_file), ("test", test_file)) if path}
    if len(given) != 1:
        raise GlmtuneError(f"give exactly one of --train-file, --validation-file, --test-file (got {len(given)})")
    split, source = next(iter(given.items()))
    mode = mode or ("train" if split == "train" else "eval")
    if mode not in data.TOKENIZE_MODES:
        raise GlmtuneError(f"--mode must be one of {', '.join(data.TOKENIZE_MODES)}, got {mode!r}")
    from glmtune.train.config import TrainConfig

    config = dataclasses.replace(TrainConfig(**_given(settings)).data_config(), max_samples=max_samples)
    config.validate()
    tokenizer = load_tokenizer(model_path, family=settings["family"])
    report = dataset_store.preprocess(source, tokenizer, output_dir, config, mode, num_workers)
    typer.echo(data.format_report(report))
    from glmtune.data.formats import format_samples

    typer.echo(format_samples(dataset_store.load_preprocessed(output_dir)[0], tokenizer))
    typer.echo(f"wrote {output_dir} (report: {output_dir / dataset_store.REPORT_FILE})")


@app.command()
@config_options()
def train(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML/JSON file of settings (keys = flag names); flags given here override it."),
    *,
    settings: dict,  # one entry per TrainConfig setting (config_options)
) -> None:
    """P-tuning v2: train a prefix for a frozen ChatGLM2 or ChatGLM3 (official defaults; resumable; torchrun data parallel)."""
    import os

    from glmtune.train.config import build_config, launch_torchrun

    run_config = build_config(config, settings)
    if run_config.nproc > 1 and "WORLD_SIZE" not in os.environ:
        # The workers see `--config TMPFILE`; they get the command as typed, for the resume hint.
        code = launch_torchrun(run_config, command_line=shlex.join(["glmtune", *sys.argv[1:]]))
        if code:
            raise typer.Exit(code)
        return
    from glmtune.train.loop import train as run_training

    result = run_training(run_config)
    if int(os.environ.get("RANK", "0")) != 0:
        raise typer.Exit(130 if result.interrupted else 0)
    if result.interrupted:
        from glmtune.train.log import resume_command

        typer.echo(f"{result.stop_reason} at step {result.global_step}; saved {result.final_checkpoint}", err=True)
        typer.echo(f"continue with:\n  {resume_command()}", err=True)
        raise typer.Exit(130)
    if result.stop_reason:
        typer.echo(result.stop_reason)
    if result.final_checkpoint is not None:
        typer.echo(f"trained to step {result.global_step}; checkpoint: {result.final_checkpoint}")
        if result.best_checkpoint is not None:
            typer.echo(f"best checkpoint: {result.best_checkpoint} ({result.metric} {result.best_metric:.6g})")
        if result.loss_curve is not None:
            typer.echo(f"loss curve: {result.loss_curve}")


# --- eval / score (evaluate, metrics) ---


@app.command("eval")
@config_options(*EVAL_DATA_SETTINGS)
def eval_command(
    model_path: Path = typer.Option(..., "--model-path", "--model_name_or_path", help="Base model folder (official layout, or written by `glmtune merge`)."),
    output_dir: Path = typer.Option(..., "--output-dir", help="Folder for generated_predictions.jsonl and predict_results.json."),
    test_file: Optional[Path] = typer.Option(None, "--test-file", help="Raw eval data (.json/.jsonl/.csv), tokenized on the fly (cached)."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="A folder written by `glmtune preprocess --mode eval` (its settings apply)."),
    ptuning_checkpoint: Optional[Path] = typer.Option(None, "--ptuning-checkpoint", help="P-tuning checkpoint folder (e.g. OUT/checkpoint-3000)."),
    pre_seq_len: Optional[int] = typer.Option(None, "--pre-seq-len", help="Checked against the checkpoint (it is read from there)."),
    quantization_bit: Optional[int] = typer.Option(None, "--quantization-bit", help="Quantize the base weights to 4 or 8 bits while loading."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", "--max_predict_samples", "--max_eval_samples", help="Evaluate the first N rows."),
    batch_size: int = typer.Option(16, "--batch-size", "--per-device-eval-batch-size", help="Prompts generated together (left-padded)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Answer tokens at most (default: --max-target-length)."),
    do_sample: bool = typer.Option(False, "--do-sample/--greedy", help="Sample instead of greedy decoding (the official run samples)."),
    top_p: float = typer.Option(sampling.OFFICIAL_TOP_P, "--top-p", help="Nucleus mass when sampling (the official evaluate.sh's)."),
    temperature: float = typer.Option(sampling.OFFICIAL_TEMPERATURE, help="Temperature when sampling (the official evaluate.sh's)."),
    num_beams: int = typer.Option(1, "--num-beams", help="Beam search width."),
    seed: int = typer.Option(42, help="Random seed (sampling is reproducible with it)."),
    official_truncation: bool = typer.Option(False, "--official-truncation", help="Score against the official references: [gMASK] sop + target ids cut to max_target_length, decoded."),
    dtype: str = typer.Option("auto", help="float32, bfloat16, float16 or auto (bfloat16 on GPUs that support it, else float16; float32 on CPU)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto (CUDA when available)."),
    num_workers: int = typer.Option(1, "--num-workers", "--preprocessing_num_workers", min=1, help="Processes for tokenizing and scoring."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar while generating."),
    family: Optional[str] = typer.Option(None, "--family", help=FAMILY_HELP),
    compare_base: bool = typer.Option(False, "--compare-base", help="Also score the base model (prefix off) on the same rows, side by side [default: off]."),
    general_file: Optional[Path] = typer.Option(None, "--general-file", help="With --compare-base: general-purpose prompts; reports how far the tuned answers moved from the base's."),
    *,
    settings: dict,  # the EVAL_DATA_SETTINGS (config_options)
) -> None:
    """Generate for an eval set (batched, greedy by default) and score BLEU-4 / ROUGE-1/2/L as the official scripts."""
    from glmtune.data import preprocess as data
    from glmtune.evaluation import generate as evaluate

    if general_file is not None and not compare_base:
        raise GlmtuneError("--general-file needs --compare-base")

    given = _given(settings)
    if dataset is not None and given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        typer.echo(f"warning: {flags} ignored: the preprocessed --dataset keeps the settings it was made with", err=True)
    config = data.DataConfig(**given, max_samples=max_samples)
    generation = evaluate.GenerationSettings(max_new_tokens=max_new_tokens, do_sample=do_sample, top_p=top_p,
                                             temperature=temperature, num_beams=num_beams, seed=seed)
    if compare_base:
        comparison = evaluate.compare_base(
            model_path, output_dir, test_file=test_file, dataset_dir=dataset, general_file=general_file, config=config,
            ptuning_checkpoint=ptuning_checkpoint, quantization_bit=quantization_bit, settings=generation,
            batch_size=batch_size, official_truncation=official_truncation, dtype=dtype, device=device,
            num_workers=num_workers, progress=progress, family=family)
        typer.echo(evaluate.format_comparison(comparison))
        typer.echo(f"wrote {output_dir / evaluate.COMPARISON_FILE} (predictions in {output_dir / 'base'} and {output_dir / 'tuned'})")
        return
    out = evaluate.run_eval(
        model_path, output_dir, test_file=test_file, dataset_dir=dataset, config=config,
        ptuning_checkpoint=ptuning_checkpoint, pre_seq_len=pre_seq_len, quantization_bit=quantization_bit,
        settings=generation, batch_size=batch_size, official_truncation=official_truncation, dtype=dtype,
        device=device, num_workers=num_workers, progress=progress, family=family,
    )
    dropped = evaluate.dropped_rows_message(out.dropped, out.results["predict_samples"])
    if dropped:
        typer.echo(f"note: {dropped}", err=True)
    if out.results.get("empty_predictions"):
        typer.echo(f"warning: {out.results['empty_predictions']} of {out.results['predict_samples']} pairs have an "
                   "empty prediction or reference (scored 0)", err=True)
    typer.echo(evaluate.format_summary(out.results))
    typer.echo(f"wrote {out.predictions_file} and {out.results_file}")


@app.command()
def score(
    file: Path = typer.Argument(..., help="generated_predictions.jsonl (glmtune) or generated_predictions.txt (official)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Results JSON (default: <FILE stem>.scores.json beside FILE)."),
    num_workers: int = typer.Option(1, "--num-workers", "--num_workers", min=1, help="Processes for scoring."),
) -> None:
    """Score predictions with the official BLEU-4 and ROUGE-1/2/L (x100) and write them as JSON."""
    from glmtune.evaluation import metrics

    predictions, labels = metrics.read_predictions(file)
    result = metrics.compute_metrics(predictions, labels, num_workers=num_workers)
    # compute_metrics has already logged a warning for blank pairs; the table shows their count.
    typer.echo(metrics.format_table(result))
    path = metrics.write_json(result.to_json("predict"), output or file.with_name(f"{file.stem}.scores.json"))
    typer.echo(f"wrote {path}")


# --- chat / merge (chat, merge) ---


@app.command()
def chat(
    model_path: Path = typer.Option(..., "--model-path", "--model_name_or_path", help="Base model folder, or one written by `glmtune merge`."),
    ptuning_checkpoint: Optional[Path] = typer.Option(None, "--ptuning-checkpoint", help="P-tuning checkpoint folder (pre_seq_len / prefix_projection are read from it)."),
    quantization_bit: Optional[int] = typer.Option(None, "--quantization-bit", help="Quantize the base weights to 4 or 8 bits while loading."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto (CUDA when available)."),
    dtype: str = typer.Option("auto", help="float32, bfloat16, float16 or auto (bfloat16 on GPUs that support it, else float16; float32 on CPU)."),
    top_p: float = typer.Option(sampling.CHAT_TOP_P, "--top-p", help="Nucleus sampling mass (the official chat's)."),
    temperature: float = typer.Option(sampling.CHAT_TEMPERATURE, help="Sampling temperature (the official chat's)."),
    max_length: int = typer.Option(sampling.DEFAULT_MAX_LENGTH, "--max-length", min=2, help="Prompt + answer tokens at most (also capped by the model's seq_length); older rounds are dropped to fit."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Answer tokens at most (default: what the window leaves)."),
    do_sample: bool = typer.Option(True, "--do-sample/--greedy", help="Sample (official default) or decode greedily."),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
    query: Optional[str] = typer.Option(None, "--query", "-q", help="One-shot: answer this and exit."),
    history_file: Optional[Path] = typer.Option(None, "--history-file", help="One-shot: JSON list of [query, answer] pairs before --query."),
    json_out: bool = typer.Option(False, "--json", help="One-shot: print {\"response\", \"history\"} as JSON."),
    debug_prompt: bool = typer.Option(False, "--debug-prompt", help="Print each prompt sent to the model (JSON string) and its token count to stderr."),
    family: Optional[str] = typer.Option(None, "--family", help=FAMILY_HELP),
    system: Optional[str] = typer.Option(None, "--system", help="ChatGLM3: system prompt."),
    tools: Optional[Path] = typer.Option(None, "--tools", help="ChatGLM3: JSON file with a list of tool descriptions (tool calls are shown, never executed)."),
    role: str = typer.Option("user", "--role", help="ChatGLM3 one-shot: role of --query (user, or observation to answer a tool call)."),
) -> None:
    """Chat in the terminal (streaming, multi-turn), or answer one --query and exit."""
    if query is None and (history_file is not None or json_out):
        raise GlmtuneError("--history-file and --json need --query (one-shot mode)")
    if query is not None and not query.strip():
        raise GlmtuneError("--query: empty")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise GlmtuneError(f"sampling needs --temperature > 0 and 0 < --top-p <= 1 (found {temperature}, {top_p}); or pass --greedy")
    import json

    from glmtune.inference import chat as chat_lib
    from glmtune.families.registry import family_of

    history = chat_lib.read_history_file(history_file) if history_file is not None else []
    tool_list = chat_lib.read_tools_file(tools) if tools is not None else None
    if query is None:
        typer.echo("loading model ...", err=True)
    model, tokenizer = chat_lib.load_chat_model(
        model_path, ptuning_checkpoint, quantization_bit=quantization_bit, device=device, dtype=dtype, family=family
    )
    model_family = family_of(tokenizer)
    # The --system / --tools opening (ChatGLM3 only), in front of the history file's turns.
    history = model_family.opening_history(system, tool_list, history)
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
    options = dict(max_length=max_length, max_new_tokens=max_new_tokens, do_sample=do_sample, top_p=top_p,
                   temperature=temperature)
    if query is None:
        if sys.stdin.isatty():
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
        chat_lib.run_repl(model, tokenizer, debug_prompt=debug_prompt, start=history, **options)
        return

    def note(prepared) -> None:
        if prepared.dropped:
            typer.echo(f"note: {chat_lib.truncation_message(prepared)}", err=True)
        if debug_prompt:
            typer.echo(f"[prompt {len(prepared.input_ids)} tokens] {json.dumps(prepared.prompt, ensure_ascii=False)}", err=True)

    response, new_history = chat_lib.chat(model, tokenizer, query, history, on_prompt=note, role=role, **options)
    if json_out:
        shown = model_family.history_json(new_history)
        typer.echo(json.dumps({"response": response, "history": shown}, ensure_ascii=False))
    else:
        typer.echo(response if isinstance(response, str) else json.dumps(response, ensure_ascii=False))


@app.command()
def merge(
    model_path: Path = typer.Option(..., "--model-path", "--model_name_or_path", help="Base model folder."),
    ptuning_checkpoint: Path = typer.Option(..., "--ptuning-checkpoint", "--ptuning_checkpoint", help="P-tuning checkpoint folder to bake in."),
    output_dir: Path = typer.Option(..., "--output-dir", "--output_dir", help="Folder to write (must be empty or absent unless --force)."),
    quantization_bit: Optional[int] = typer.Option(None, "--quantization-bit", "--quantization_bit", help="Store the base weights quantized to 4 or 8 bits."),
    fold_prefix: bool = typer.Option(False, "--fold-prefix", help="Store the prefix after its projection MLP as plain embeddings (same outputs, smaller, faster)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --output-dir."),
    dtype: str = typer.Option("auto", help="Weight dtype of the merged folder: float32, bfloat16, float16, or auto (as the base model's config)."),
    family: Optional[str] = typer.Option(None, "--family", help=FAMILY_HELP),
) -> None:
    """Bake a P-tuning checkpoint into a self-contained model folder (weights, prefix, tokenizer)."""
    from glmtune.fsutil import check_output_dir

    check_output_dir(output_dir, force, model_path, ptuning_checkpoint)  # before loading anything heavy
    from glmtune.model.merge import merge_checkpoint

    result = merge_checkpoint(model_path, ptuning_checkpoint, output_dir, quantization_bit=quantization_bit,
                              fold=fold_prefix, force=force, dtype=dtype, family=family)
    typer.echo(result.summary())


# --- quantize (quantization) ---
@app.command()
def quantize(
    model_path: Path = typer.Option(..., "--model-path", "--model_name_or_path", help="Full-precision model folder."),
    output_dir: Path = typer.Option(..., "--output-dir", "--output_dir", help="Folder to write (must be empty or absent unless --force)."),
    bits: int = typer.Option(..., "--bits", "--quantization-bit", "--quantization_bit", help="4 or 8."),
    dtype: str = typer.Option("float16", help="dtype of the tensors left unquantized (the official releases use float16)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --output-dir."),
) -> None:
    """Write an int4/int8 copy of a model in the official ChatGLM2 quantized layout, shard by shard."""
    from glmtune.model.quantization import quantize_checkpoint

    out = quantize_checkpoint(model_path, output_dir, bits, force=force, dtype=dtype)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    typer.echo(f"wrote {out}: {bits}-bit weights, {size / 1e6:,.1f} MB")


# --- export (export) ---
@app.command("export")
def export_command(
    model_path: Path = typer.Option(..., "--model-path", "--model_name_or_path", help="Model folder (official layout, quantized, or written by `glmtune merge`)."),
    output: Path = typer.Option(..., "--output", "-o", help="Model file to write."),
    export_format: str = typer.Option(..., "--format", help="Output format: chatglm.cpp (its GGML model file)."),
    ggml_type: str = typer.Option("q4_0", "--type", help="Weight type: f32, f16, q8_0 or q4_0 (norms and biases stay f32)."),
    ptuning_checkpoint: Optional[Path] = typer.Option(None, "--ptuning-checkpoint", "--ptuning_checkpoint", help="P-tuning checkpoint whose prefix is baked in (default: the prefix a merged folder holds, if any)."),
    family: Optional[str] = typer.Option(None, "--family", help="Model family (chatglm2, chatglm3); default: detected from the model folder."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --output file."),
) -> None:
    """Write a model (+ P-tuning prefix) for another runtime: chatglm.cpp (f32 / f16 / q8_0 / q4_0)."""
    if export_format != "chatglm.cpp":
        raise GlmtuneError(f"--format: expected chatglm.cpp, found {export_format!r}")
    from glmtune.export.chatglm_cpp import export_chatglm_cpp

    result = export_chatglm_cpp(model_path, output, ggml_type, ptuning_checkpoint=ptuning_checkpoint, family=family,
                                force=force)
    typer.echo(result.summary())


# --- serve (serve) ---
@app.command()
def serve(
    model_path: Path = typer.Option(..., "--model-path", "--model_name_or_path", help="Base model folder, or one written by `glmtune merge` (served with its prefix)."),
    ptuning_checkpoint: Optional[Path] = typer.Option(None, "--ptuning-checkpoint", "--ptuning_checkpoint", help="A P-tuning checkpoint, served as a model named after its folder."),
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", help="NAME=CHECKPOINT: serve a P-tuning checkpoint as model NAME on the same base (repeatable)."),
    served_name: Optional[str] = typer.Option(None, "--served-name", help="Model id of the base (default: the folder's name)."),
    quantization_bit: Optional[int] = typer.Option(None, "--quantization-bit", "--quantization_bit", help="Quantize the base weights to 4 or 8 bits while loading."),
    dtype: str = typer.Option("auto", help="float32, bfloat16, float16 or auto (bfloat16 on GPUs that support it, else float16; float32 on CPU)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto (CUDA when available)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (only this machine by default)."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="GLMTUNE_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 (or set GLMTUNE_API_KEY)."),
    max_batch_size: int = typer.Option(8, "--max-batch-size", min=1, help="Requests decoded together; more wait for a free row."),
    max_length: int = typer.Option(8192, "--max-length", min=2, help="Prompt + answer tokens at most (also capped by the model's seq_length)."),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", min=1, help="Cap on a request's max_tokens."),
    max_request_bytes: int = typer.Option(1_000_000, "--max-request-bytes", min=1024, help="Request bodies over this size get 413."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level: critical, error, warning, info, debug."),
) -> None:
    """Serve the base model and P-tuning adapters over an OpenAI-compatible API, with a chat page at /."""
    from glmtune.serve.models import parse_adapter_specs

    adapters = parse_adapter_specs(adapter)
    from glmtune.serve.api import run_server

    run_server(model_path, adapters=adapters, ptuning_checkpoint=ptuning_checkpoint, served_name=served_name,
               quantization_bit=quantization_bit, dtype=dtype, device=device, host=host, port=port, api_key=api_key,
               max_batch_size=max_batch_size, max_length=max_length, max_new_tokens=max_new_tokens,
               max_body_bytes=max_request_bytes, log_level=log_level)



def main() -> None:
    try:
        app()
    except GlmtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
