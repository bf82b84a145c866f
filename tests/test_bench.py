"""bench.py runs end to end: every measurement is there, with positive figures. Speed is never asserted here."""
import datetime
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

pytestmark = pytest.mark.slow  # bench.py subprocesses
EXPECTED = {"train/step_time", "train/tokens_per_s", "train/peak_memory", "ckpt/save", "ckpt/load", "ckpt/writer",
            "prepare/throughput_1w", "prepare/throughput_2w", "prepare/decontamination_1w", "prepare/decontamination_2w",
            "prepare/parquet_1w", "prepare/parquet_2w",
            "loader/batches_per_s", "monitor/step_time", "monitor/sink_cpu"} | \
    {f"archive/{what}/{fmt}" for what in ("tiny", "phi2_bf16") for fmt in ("zst", "gz", "bz2", "xz")}


def test_smoke_writes_every_measurement(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench.py", "--smoke", "--json", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert res["commit"] == head.stdout.strip() and res["command"].startswith("python bench.py --smoke")
    assert abs(datetime.date.fromisoformat(res["date"]) - datetime.date.today()) <= datetime.timedelta(days=1)
    rows = {row["name"]: row for row in res["results"]}
    assert set(rows) == EXPECTED
    for name, row in rows.items():
        assert row["unit"] and row["better"] in ("higher", "lower"), name
        for key in ("ours", "baseline", "ratio"):
            assert isinstance(row[key], float) and row[key] > 0, (name, key, row[key])
        assert abs(row["ratio"] - row["ours"] / row["baseline"]) < 1e-9 * row["ratio"], name
        assert name in r.stdout  # the printed table
    assert rows["train/tokens_per_s"]["details"]["mfu_pct"] is None  # CPU: no peak FLOPs to compare with
    assert rows["train/peak_memory"]["details"]["how"].startswith("peak RSS")
    sink = rows["monitor/sink_cpu"]["details"]
    assert sink["sinks_on"] == {"tensorboard": True, "wandb": True}  # the "on" side really had both sinks
    assert sink["log_step_cpu_ms_on"] > sink["log_step_cpu_ms_off"] > 0
    assert abs(sink["overhead_pct"] - 100 * (rows["monitor/sink_cpu"]["ratio"] - 1)) < 1e-6
    for w in (1, 2):  # the stricter baseline (only what passes the filters) and the listing+reading time come too
        d = rows[f"prepare/throughput_{w}w"]["details"]  # mb: meta.json's mb_read, to 3 decimals
        assert d["workers"] == w and 0 < d["filtered_mb"] <= d["mb"] + 1e-3 and 0 < d["read_seconds"] < d["seconds"]
        assert abs(d["strict_ratio"] - d["filtered_seconds"] / d["seconds"]) < 1e-9
        decon = rows[f"prepare/decontamination_{w}w"]["details"]  # the check alone, and its share of prepare.py's time
        assert 0 < decon["check_seconds"] < d["seconds"] * w and decon["benchmarks"]["humaneval"]["texts"] == 328
        assert rows[f"prepare/parquet_{w}w"]["details"]["mb"] == d["mb"]  # the same documents, from parquet
    for fmt in ("zst", "gz", "bz2", "xz"):  # every format compresses, and its archive unpacked and verified
        assert rows[f"archive/tiny/{fmt}"]["details"]["compression_ratio"] > 1
        assert rows[f"archive/phi2_bf16/{fmt}"]["details"]["unpack_mb_per_s"] > 0


def test_bad_arguments_give_one_line_errors():
    r = subprocess.run([sys.executable, "bench.py", "--what", "train,speed"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == "error: --what: unknown measurement 'speed'; use " \
        "train,ckpt,archive,loader,prepare,monitor", r.stderr
    import bench
    with pytest.raises(ValueError, match="random-init models"):
        bench.main(["--what", "train", "--init_from=/some/phi-2"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--gpu-table needs a CUDA device"):
            bench.main(["--gpu-table"])
