import subprocess
import sys

import openseek
from openseek.cli import COMMANDS, main


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"openseek {openseek.__version__}"
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"  {command} " in out


def test_unknown_command_is_named(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "openseek.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("openseek ")
