"""Shared test helpers: running torchtune's `tune run` CLI in-process and reading its logs."""

import re
import shutil
import sys
from pathlib import Path
from unittest.mock import patch

from torchtune._cli.tune import main as tune_main

REPO = Path(__file__).resolve().parents[1]
TUNE = shutil.which("tune", path=str(Path(sys.executable).parent))  # for subprocess tests


def tune_run(recipe: str, config: str, *overrides: str, capsys=None) -> tuple[int, str, str]:
    """Run `tune run recipes/<recipe> --config <config> <overrides>` in-process, as
    torchtune's own recipe tests do; returns (exit code, stdout, stderr)."""
    argv = ["tune", "run", f"recipes/{recipe}", "--config", config, *overrides]
    code = 0
    with patch.object(sys, "argv", argv):
        try:
            tune_main()  # the `tune` script's own entry point, wherever torchtune is installed
        except SystemExit as exit_:
            code = exit_.code or 0
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


def logged(out: Path, key: str) -> list[float]:
    """Values of ``key`` in a run's DiskLogger files."""
    text = "".join(p.read_text() for p in sorted((out / "logs").glob("*.txt")))
    return [float(v) for v in re.findall(rf"(?:^|\s){re.escape(key)}:(\S+)", text)]
