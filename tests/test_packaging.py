"""The wheel carries the shipped tuners, and an install finds them (--tuner auto) without the repo."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_tuners_and_an_install_finds_them(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("zoft-*.whl")
    shipped = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("pretrained_tuners/*/tuner.safetensors"))
    allocations = {f"zoft/{p.relative_to(ROOT).as_posix()}" for p in ROOT.glob("pretrained_tuners/*/allocation.safetensors")}
    assert shipped, "the repository ships no tuner"
    with zipfile.ZipFile(wheel) as z:
        assert {f"zoft/{p}" for p in shipped} | allocations <= set(z.namelist())
        z.extractall(tmp_path / "site")
    found = subprocess.run(
        [sys.executable, "-c", "import zoft.tuner as t; print('\\n'.join(str(p) for p in t.shipped_tuners()))"],
        env={"PYTHONPATH": str(tmp_path / "site")}, cwd=tmp_path, check=True, capture_output=True, text=True)
    assert found.stdout.split() == [str(tmp_path / "site" / "zoft" / p) for p in shipped]
