"""A W&B offline run, read back from the run's own .wandb log (no login, no network)."""

import struct

import pytest

from zoft.cli import main

pytest.importorskip("wandb")


def read_wandb_records(path):
    """The protobuf records of a .wandb file: a 7-byte header (':W&B', magic, version), then the
    LevelDB log format in 32 KiB blocks (record header: crc32, length, type full/first/mid/last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0:  # zero padding up to the block's end
            pos += room - 7
            continue
        pending += data[pos : pos + length]
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_log(run_dir):
    """The run's .wandb log once W&B's service has closed it: finish() can return while the service
    still buffers the file (wandb/wandb#9525), so read only after teardown."""
    import wandb

    wandb.teardown()
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    return log


def _key(item):
    return item.key or "/".join(item.nested_key)  # keys with '/' are stored as nested keys


def test_offline_run_holds_config_metrics_and_summary(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    code = main(["finetune", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--run-name", "w",
                 "--num-train", "16", "--num-dev", "8", "--num-test", "8", "--batch-size", "4", "--steps", "3",
                 "--eval-every", "1", "--estimator", "kernel", "--report-to", "wandb"])
    assert code == 0
    records = read_wandb_records(finished_log(tmp_path / "w"))
    by_type = {}
    for r in records:
        by_type.setdefault(r.WhichOneof("record_type"), []).append(r)
    (run,) = by_type["run"]
    assert (run.run.project, run.run.job_type) == ("zoft", "kernel")
    assert run.run.run_group == f"{tiny_model_dir.name}/tweets"
    assert {"kernel", "isotropic", "full", "table"} <= set(run.run.tags)
    config = {_key(item) for item in run.run.config.update}
    assert {"lr", "eps", "estimator", "kernel_order", "seed", "versions", "trainable_params"} <= config
    logged = {_key(item) for r in by_type["history"] for item in r.history.item}
    assert {"train/loss", "train/loss_minus", "train/proj_grad", "lr", "forward_passes", "train_seconds",
            "peak_memory_mb", "dev/acc", "dev/loss", "test/acc"} <= logged
    summary = {_key(item) for r in by_type["summary"] for item in r.summary.update}
    assert {"test_acc_before", "test_acc_after", "best_dev_acc", "final_dev_acc"} <= summary


def test_tuner_scales_and_meta_trained_artifact_reach_wandb(tmp_path, tiny_model_dir, monkeypatch):
    from meta_train.train import MetaTrainConfig, meta_train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "tuner"
    meta_train(MetaTrainConfig(output=str(out), model=str(tiny_model_dir), tasks="tweets", steps=2, restart_every=2,
                               batch_size=4, num_train=16, report_to="wandb"))
    records = read_wandb_records(finished_log(out))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "artifact" in kinds
    (artifact,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert artifact.type == "zoft-tuner" and "tuner.safetensors" in {e.path for e in artifact.manifest.contents}
    logged = {_key(i) for r in records if r.WhichOneof("record_type") == "history" for i in r.history.item}
    assert {"meta_loss", "loss", "trajectory_loss", "sigma/layer_00", "sigma/layer_01", "sigma/embed"} <= logged

    code = main(["finetune", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "runs"), "--run-name", "t",
                 "--num-train", "16", "--num-dev", "8", "--num-test", "8", "--batch-size", "4", "--steps", "2",
                 "--eval-every", "1", "--tuner", str(out), "--report-to", "wandb"])
    assert code == 0
    logged = {_key(i) for r in read_wandb_records(finished_log(tmp_path / "runs" / "t")) if r.WhichOneof("record_type") == "history" for i in r.history.item}
    assert {"sigma/layer_00", "sigma/layer_01", "sigma/embed", "sigma/other"} <= logged
