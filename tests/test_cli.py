"""The command line as a user meets it: help lists every command and does not import torch."""

from __future__ import annotations

import subprocess
import sys

COMMANDS = ["init-model", "preprocess", "train", "eval", "score", "chat", "merge", "quantize", "export"]


def test_help_lists_every_command_without_importing_torch():
    code = (
        "import sys\n"
        "from glmtune.cli import app\n"
        "from typer.testing import CliRunner\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "print(result.output)\n"
        "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'TORCH_NOT_IMPORTED')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "TORCH_NOT_IMPORTED" in out
    for command in COMMANDS:
        assert command in out, f"{command} missing from glmtune --help"


def test_console_script_reports_user_errors_with_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "glmtune", "chat", "--model-path", str(tmp_path), "--query", "hi"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "config.json" in proc.stderr
