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
    allocations = {f"zoft/{p.relative_to(ROOT).as_posix()}" for p in ROOT.glob("pretrained_tuners/*/allocation*.safetensors")}
    assert shipped, "the repository ships no tuner"
    with zipfile.ZipFile(wheel) as z:
        assert {f"zoft/{p}" for p in shipped} | allocations <= set(z.namelist())
        z.extractall(tmp_path / "site")
    found = subprocess.run(
        [sys.executable, "-c", "import zoft.tuner as t; print('\\n'.join(str(p) for p in t.shipped_tuners()))"],
        env={"PYTHONPATH": str(tmp_path / "site")}, cwd=tmp_path, check=True, capture_output=True, text=True)
    assert found.stdout.split() == [str(tmp_path / "site" / "zoft" / p) for p in shipped]


def test_make_demo_runs_the_demo_grids_flagship_point():
    """The README's demo figure comes from bench/grids/demo.yaml; make demo must be its first
    point (the flagship at seed 0), flag for flag."""
    import dataclasses
    import shlex

    from zoft.cli import build_parser
    from zoft.finetune import FinetuneConfig
    from zoft.grid import grid_configs

    recipe = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].replace("\\\n", " ").split("\n")[1]
    words = shlex.split(recipe)
    args = vars(build_parser().parse_args(words[words.index("finetune"):]))
    demo = FinetuneConfig(**{k: v for k, v in args.items() if k not in ("command", "handler", "resume")})
    flagship = grid_configs(ROOT / "bench/grids/demo.yaml")[0]
    assert flagship.head_init == "probe"
    differ = {f.name for f in dataclasses.fields(FinetuneConfig) if getattr(demo, f.name) != getattr(flagship, f.name)}
    assert differ == {"output_dir", "run_name"}
