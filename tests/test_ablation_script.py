"""scripts/ablation.sh finds an interpreter where only `python3` exists (as on some GPU images)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def layout(tmp_path: Path, tools: dict[str, str]) -> dict:
    """A copy of the script and the one config it reads, and a PATH holding only `tools`."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "ablation.sh", tmp_path / "scripts")
    (tmp_path / "configs" / "ablation").mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "ablation" / "supervised-sick.json", tmp_path / "configs" / "ablation")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sts-dev-500.csv").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, target in tools.items():
        (bin_dir / name).symlink_to(target)
    return {**os.environ, "PATH": str(bin_dir)}


@pytest.mark.parametrize("with_python3", [True, False])
def test_ablation_finds_python3_or_says_so(tmp_path, with_python3):
    tools = {"dirname": shutil.which("dirname")} | ({"python3": sys.executable} if with_python3 else {})
    env = layout(tmp_path, tools)
    env.pop("PY", None)
    r = subprocess.run(
        [shutil.which("bash"), str(tmp_path / "scripts" / "ablation.sh"), "no-such-row"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    if with_python3:  # got past the line that reads the KE prompt with the interpreter
        assert r.stderr.strip() == "unknown row no-such-row"
    else:
        assert "neither python nor python3 is on PATH" in r.stderr
