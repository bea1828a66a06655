"""bench/depth_profile.py: an allocation reduced to its depth profile."""

import json

import torch

from conftest import bench_script
from zoft.block_scales import read_scales_file, write_block_scales

depth = bench_script("depth_profile")

NAMES = ["model.embed_tokens.weight", "model.layers.0.q.weight", "model.layers.0.v.weight",
         "model.layers.1.q.weight", "model.layers.1.v.weight", "model.layers.1.norm.weight", "model.norm.weight"]


def test_each_layer_s_blocks_get_their_geometric_mean_and_blocks_outside_layers_keep_theirs(tmp_path, capsys):
    source, out = tmp_path / "alloc.safetensors", tmp_path / "depth.safetensors"
    write_block_scales(source, json.dumps(NAMES), "fp123", torch.tensor([5.0, 1.0, 4.0, 1.0, 2.0, 4.0, 0.5]))
    assert depth.main([str(source), "--out", str(out)]) == 0
    meta, tensors = read_scales_file(out)
    assert json.loads(meta["blocks"]) == NAMES and meta["fingerprint"] == "fp123"  # loads for the same model
    assert torch.allclose(tensors["sigma"], torch.tensor([5.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.5], dtype=torch.float64))
    assert "(last / first: 1.00)" in capsys.readouterr().out


def test_a_file_without_layers_or_with_a_schedule_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    flat, out = tmp_path / "flat.safetensors", tmp_path / "depth.safetensors"
    write_block_scales(flat, json.dumps(["model.embed_tokens.weight"]), None, torch.tensor([1.0]))
    assert depth.main([str(flat), "--out", str(out)]) == 2
    schedule = tmp_path / "schedule.safetensors"
    write_block_scales(schedule, json.dumps(NAMES), None, torch.ones(2, len(NAMES)), from_step=[0, 10])
    assert depth.main([str(schedule), "--out", str(out)]) == 2
    assert depth.main([str(tmp_path / "missing.safetensors"), "--out", str(out)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("zoft: error: ") for line in err)
