"""Stack block_scales files into one schedule: the first file's σ from step 0, each next one from
its step on (``--perturbation block_scales`` reads it, and switches rows during the run).

    python bench/scale_schedule.py --out SCHEDULE.safetensors A.safetensors B.safetensors@50 [...] [--energy 1,0.02]

The files must be made for the same blocks (names and shapes); each row keeps its own σ. The engine
normalises every row to the same perturbation energy, times the row's ``--energy`` (default 1): an
allocation that stands a smaller step than the one before it (bench/ceiling_predict.py predicts
each one's best lr at a state) gets a smaller energy.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from zoft.block_scales import read_scales_file, write_block_scales


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("files", nargs="+", help="FILE (the first, from step 0) then FILE@STEP")
    ap.add_argument("--energy", default="", help="comma-separated, one per file: each row's perturbation energy")
    args = ap.parse_args(argv)
    energy = [float(x) for x in args.energy.split(",")] if args.energy else [1.0] * len(args.files)
    if len(energy) != len(args.files):
        sys.exit(f"--energy has {len(energy)} values for {len(args.files)} files")
    rows, steps, headers, fingerprints, notes = [], [], [], set(), []
    for spec in args.files:
        path, _, step = spec.rpartition("@") if "@" in spec else (spec, "", "0")
        meta, tensors = read_scales_file(path)
        if set(tensors) != {"sigma"} or tensors["sigma"].dim() != 1:
            sys.exit(f"{path} is a schedule already; stack one-allocation files")
        rows.append(tensors["sigma"].double())
        steps.append(int(step))
        headers.append(meta["blocks"])
        fingerprints.add(meta.get("fingerprint"))  # files written before fingerprints have none
        notes.append({"file": path, "from_step": int(step), "note": meta.get("note", "")})
    fingerprints.discard(None)
    if len(set(headers)) != 1 or len(fingerprints) > 1:
        sys.exit("the files were made for different blocks")
    write_block_scales(args.out, headers[0], fingerprints.pop() if fingerprints else None, torch.stack(rows),
                       json.dumps(notes), steps, energy)
    print(f"{args.out}: {len(rows)} rows from steps {steps}, energy {energy}")


if __name__ == "__main__":
    main()
