"""wandb as a tracker, for real, in offline mode: the run is written under run_dir/wandb with
every logged step, and an API key in the environment reaches no file and no output."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest

from alphadrive_ray.config import ConfigError, WandbConfig, load_config

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # the shape of a W&B API key


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a `.wandb` run file (a LevelDB-style log: 7-byte file header, then
    32 KiB blocks of records with a 7-byte header each: CRC-32C, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending += payload
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def read_finished_run(path: Path, timeout_s: float = 60.0) -> list:
    """The records once the run's `exit` record is on disk (wandb's service writes behind `finish`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)


def test_offline_run_holds_every_step_and_no_key(wandb_env, tmp_path, capfd):
    from alphadrive_ray.tracking import Tracker, WandbSink

    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, tensorboard=False, stream=open(os.devnull, "w"))
    sink = WandbSink(run_dir, WandbConfig(mode="offline", project="tests"), "wandb-offline", {"run": {"name": "wandb-offline"}, "grpo": {"steps": 3}})
    tracker.add_sink(sink)
    for step in (1, 2):
        tracker.log("sft", step, {"loss/sft": 2.0 / step})
    for step in (1, 2, 3):
        tracker.log("grpo", step, {"reward/total": 0.5 * step, "loss/kl": 0.01})
    tracker.log("eval", 4, {"eval/accuracy": 0.75})
    tracker.close()  # finishes the W&B run

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = read_finished_run(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "tests" and run.display_name == "wandb-offline"
    history = [
        {item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    grpo = [h for h in history if "grpo/reward/total" in h]
    assert [float(h["grpo/reward/total"]) for h in grpo] == [0.5, 1.0, 1.5]
    assert [int(h["grpo/step"]) for h in grpo] == [1, 2, 3]  # each stage against its own step
    assert [float(h["sft/loss/sft"]) for h in history if "sft/loss/sft" in h] == [2.0, 1.0]
    assert any("eval/eval/accuracy" in h for h in history)
    config = {item.key: item.value_json for item in run.config.update}  # the resolved config, as given
    assert "grpo" in config and "3" in config["grpo"]
    assert "exit" in kinds  # the run was closed cleanly
    # the key in the environment reached no file of the run and nothing it printed
    out, err = capfd.readouterr()
    assert FAKE_KEY not in out + err
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path
    assert (run_dir / "wandb" / "run-id").read_text().strip() == run.run_id


def test_resume_continues_the_same_run(wandb_env, tmp_path):
    from alphadrive_ray.tracking import WandbSink

    first = WandbSink(tmp_path, WandbConfig(mode="offline"), "r", {})
    first.close()
    again = WandbSink(tmp_path, WandbConfig(mode="offline"), "r", {}, resume=True)
    again.close()
    fresh = WandbSink(tmp_path, WandbConfig(mode="offline"), "r", {})
    fresh.close()
    assert again.run.id == first.run.id != fresh.run.id


# (override, expected message) of the tracking section
BAD = [
    ("tracking.wandb.mode=cloud", "tracking.wandb.mode must be one of disabled, offline, online"),
    (f"tracking.wandb.name=run-{FAKE_KEY}", "tracking.wandb.name looks like an API key"),
    (f"tracking.wandb.project={FAKE_KEY}", "tracking.wandb.project looks like an API key"),
    ("tracking.wandb.api_key=x", "unknown config key `tracking.wandb.api_key`"),
]


@pytest.mark.parametrize("override, message", BAD)
def test_bad_tracking_config(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("`", ".")):
        load_config(None, [override])


def test_commit_ids_elsewhere_are_not_keys():
    # a model in a Hugging Face cache: 40 hex digits of a commit, not a secret
    config = load_config(None, [f"model.path=/cache/models--Qwen--Qwen2-VL-2B/snapshots/{'a1' * 20}", "tracking.wandb.mode=offline"])
    assert config.tracking.wandb.mode == "offline" and config.tracking.wandb.project == "alphadrive-ray"
