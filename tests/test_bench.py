"""bench.py runs end to end: every measurement is there, with positive figures. Speed is never asserted here."""
import datetime
import json
import os
import subprocess
import sys
import time

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


# the rows of --gpu-table --smoke (config/phi2_xml.py's 2 + 5 blocks on the "test" preset; plan.py's largest
# micro-batch is 4 for every AC mode in its 0.02 GiB): (a) AC x micro-batch, (b) float8, (c) long, (d) HF, (e) paths
GPU_ROWS = [f"a/ac={ac},mb={mb}" for ac in ("op", "none", "full") for mb in (1, 2, 4)] + \
    ["b/bf16", "b/float8=tensorwise", "b/float8=rowwise", "c/T=512,ac=full,mb=4", "c/T=512,ac=op,mb=4", "d/hf",
     "e/ckpt_async", "e/cpu_offload", "e/auto_batch_size", "e/fp16_scaler", "e/nvml"]


def test_gpu_table_smoke_runs_every_row_in_under_a_minute(tmp_path):
    out = tmp_path / "gpu.json"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "bench.py", "--gpu-table", "--smoke", "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    took = time.perf_counter() - t
    assert r.returncode == 0, r.stderr[-3000:]
    table = json.loads(out.read_text())
    rows = {x["name"]: x for x in table["results"]}
    assert sorted(rows) == sorted(GPU_ROWS), sorted(rows)
    status = {n: x["details"]["status"] for n, x in rows.items()}
    assert status.pop("e/cpu_offload") == "skipped: cpu_offload needs CUDA"
    assert set(status.values()) == {"measured"}, status
    for name in GPU_ROWS[:14]:  # every training row: speed, MFU's convention, peak memory and plan.py's beside it
        d = rows[name]["details"]
        assert rows[name]["ours"] > 0 and d["peak_mib"] > 0 and d["simulated_mib"] > 0, name
        assert d["mfu_pct"] is None and d["mfu_attention"].startswith("counted"), name  # CPU: no peak FLOP/s
        assert d["steps"] >= 1 and len(d["losses"]) == d["steps"] + (1 if name.startswith("c/") else 2), name
        prof = d["profile"]  # one more step under torch.profiler: what explains a missed goal
        assert prof["gpu_idle_pct"] is None and 0 < sum(x["pct"] for x in prof["top"]) <= 100 + 1e-6, name
        assert len(prof["top"]) == 10 and prof["top"][0]["ms"] >= prof["top"][-1]["ms"] >= 0 < prof["span_ms"], name
    assert [rows[f"a/ac={ac},mb=4"]["details"]["ac"] for ac in ("op", "none", "full")] == ["op", "none", "full"]
    for recipe in ("tensorwise", "rowwise"):  # float8 beside its bf16 twin, on the same batches
        row = rows[f"b/float8={recipe}"]
        assert row["details"]["float8"] == recipe and row["baseline"] == rows["b/bf16"]["ours"]
        assert 0 < row["details"]["loss_max_rel_diff"] < 0.01
    assert rows["c/T=512,ac=full,mb=4"]["details"]["block_size"] == 512
    # HF at the best setting of (a)'s rows run before it: op at 1, then each AC mode at the plan's largest
    first = ["a/ac=op,mb=1", "a/ac=none,mb=4", "a/ac=op,mb=4", "a/ac=full,mb=4"]
    best = max(first, key=lambda n: rows[n]["ours"])
    assert rows["d/hf"]["baseline"] > 0 and rows["d/hf"]["details"]["ours_row"] == best
    assert rows["d/hf"]["ours"] == rows[best]["ours"]
    assert rows["d/hf"]["details"]["args"] == rows[best]["details"]["args"]
    assert [r["name"] for r in table["results"]][:4] == first  # in the order they ran, most important first
    assert rows["e/ckpt_async"]["details"]["verify_problems"] == []
    assert rows["e/auto_batch_size"]["ours"] == 2 and rows["e/auto_batch_size"]["details"]["out_of_memory_at"] == [8, 4]
    fp16 = rows["e/fp16_scaler"]
    assert fp16["ours"] == 10 and fp16["details"]["scale_moved"]
    assert rows["e/nvml"]["details"]["sys/cpu_pct"] >= 0  # the GPU's stats need CUDA: counted, 0 here
    assert took < 60, took


def hang(spec, path):  # a row that never ends
    time.sleep(600)


def test_gpu_table_row_guard_kills_a_slow_row(tmp_path):
    """A row that outlives its guard is killed and written as timed out; once the budget is spent, rows are
    written as not run: each call leaves a row for every row it reached."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import bench
    path = str(tmp_path / "gpu.json")
    with open(path, "w") as f:
        json.dump({"results": []}, f)
    ctx = mp.get_context("forkserver")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        t = bench.GpuTable(path, dict(min_start=1), time.monotonic() + 60, 1.0, ctx, pool)
        started = time.perf_counter()
        bench.run_row(t, dict(name="slow", fn=hang, guard=2))
        assert time.perf_counter() - started < 30
        t.deadline = time.monotonic()
        bench.run_row(t, dict(name="late", fn=hang, guard=2))
    status = {n: r["details"]["status"] for n, r in bench.load_rows(path).items()}
    assert status == {"slow": "timed out after 2 s", "late": "not run: the budget ran out"}
