"""Shards: prepare.py --shard=I/N runs, on any machines, each over every N-th file; then one join.

    i, n = parse_shard("3/16")
    meta = merge("data/web")     # python data/prepare.py --merge --out data/web

A shard drops the copies it sees itself; the join drops the rest with dedup.later_copies over the keys of
every shard's documents (docs.*.npy), so the documents kept are the ones a single run keeps. It rewrites
no tokens: each stream becomes the kept ranges of the shard files ({split}_{lang}.ranges.npy), which
data/format.py reads as one array. Its memory is about 200 bytes per document of all shards.
"""
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from data.decontam import PATHS_KEPT
from data.dedup import later_copies
from data.format import (LANGS, POS_BITS, VERSION, DataError, docs_table_name, missing_shard_error, missing_shards,
                         open_tokens, read_meta, shard_meta_name)


def parse_shard(spec):
    """'I/N' -> (I, N) with 0 <= I < N."""
    i, slash, n = str(spec).partition("/")
    if not (slash and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise DataError(f"--shard={spec} is not I/N with 0 <= I < N: write e.g. --shard=0/4 ... --shard=3/4 "
                        f"for 4 shards")
    return int(i), int(n)


def shard_metas(out):
    """The N shard metas in out, checked to belong together."""
    shards = missing_shards(out)
    if not shards:
        raise DataError(f"{out} holds no shards (shard.*.json): run data/prepare.py with --shard=I/N first")
    n, missing = shards
    if missing:
        raise missing_shard_error(out, n, missing)
    metas = [json.loads((Path(out) / shard_meta_name(i)).read_text()) for i in range(n)]
    first = metas[0]
    for i, m in enumerate(metas[1:], 1):
        if m["tokenizer_hash"] != first["tokenizer_hash"]:
            raise DataError(f"shard {i} was prepared with the tokenizer {m['tokenizer']} and shard 0 with "
                            f"{first['tokenizer']}, whose files differ: prepare every shard with the same --tokenizer")
        differ = sorted(k for k in first["settings"] if m["settings"].get(k) != first["settings"][k])
        if differ:
            raise DataError(f"shard {i} was prepared with other {', '.join(differ)} than shard 0: re-run it "
                            f"with the arguments of the others (or remove stale shards from {out})")
    return metas


def merge(out):
    """Join the shards in out: drop the copies that met across shards, write the ranges and meta.json."""
    t0, out = time.time(), Path(out)
    metas = shard_metas(out)
    n = len(metas)
    fingerprint = hashlib.sha256(json.dumps([m["fingerprint"] for m in metas]).encode()).hexdigest()
    try:
        meta = read_meta(out)
        if meta.get("fingerprint") == fingerprint:
            for key in meta["files"]:
                open_tokens(out, meta, *key.split("_", 1))
            return meta
    except DataError:
        pass
    tables = [np.load(out / docs_table_name(i)) for i in range(n)]
    bounds = np.cumsum([0] + [len(t) for t in tables])  # shard i's rows are table[bounds[i]:bounds[i + 1]]
    table = np.concatenate(tables)
    del tables
    exact, near = later_copies(table["pos"], table["keys"])
    drop = exact | near
    if (~table["kept"] & ~drop).any():  # a shard dropped what no earlier document explains
        raise DataError(f"the shards in {out} disagree about their documents (prepared from different files?): "
                        f"re-run them with the same sources")
    keep = ~drop & (table["copies"] > 0)  # the documents in the joined streams
    lang_of, val = table["lang"], table["val"]
    langs = sorted({LANGS[x] for x in np.unique(lang_of[~drop])})
    files, stats = {}, {lang: {} for lang in langs}
    for lang in langs:
        for split in ("train", "val"):
            key, ranges = f"{split}_{lang}", []
            sel = keep & (lang_of == LANGS.index(lang)) & (val == (split == "val"))
            for i in range(n):  # shard order: each shard's kept documents, cut where a copy was dropped
                t = table[bounds[i]:bounds[i + 1]][sel[bounds[i]:bounds[i + 1]]]
                starts, stops = t["start"], t["start"] + t["tokens"]
                cut = np.flatnonzero(starts[1:] != stops[:-1]) + 1
                if len(t):
                    ranges += [(i, a, b) for a, b in zip(starts[np.r_[0, cut]], stops[np.r_[cut - 1, len(t) - 1]])]
            mine = table[sel]
            stats[lang][split] = {"docs": int(mine["copies"].sum()), "tokens": int(mine["tokens"].sum()),
                                  "bytes": int((mine["bytes"] * mine["copies"]).sum())}
            tmp = out / f".{key}.ranges.{os.getpid()}.npy"  # several joins at once write the same content
            np.save(tmp, np.array(ranges, dtype=np.int64).reshape(-1, 3))
            os.replace(tmp, out / f"{key}.ranges.npy")
            files[key] = {"tokens": stats[lang][split]["tokens"],
                          "shards": [m["files"].get(key, {"tokens": 0})["tokens"] for m in metas]}
    dropped = {k: sum(m["filters"]["dropped"][k] for m in metas) for k in metas[0]["filters"]["dropped"]}
    dropped.update(duplicate=int(exact.sum()), near_duplicate=int(near.sum()))
    source = table["pos"] >> np.uint64(POS_BITS)
    sources = [{"path": metas[0]["sources"][s]["path"],
                "docs_read": sum(m["sources"][s]["docs_read"] for m in metas),
                "docs_kept": int((keep & (source == s)).sum())} for s in range(len(metas[0]["sources"]))]
    first, mb, seconds = metas[0], sum(m["mb_read"] for m in metas), sum(m["seconds"] for m in metas)
    contaminated = {name: {"docs": sum(m["contaminated"][name]["docs"] for m in metas),
                           "paths": [p for m in metas for p in m["contaminated"][name]["paths"]][:PATHS_KEPT]}
                    for name in first["contaminated"]}
    meta = {"version": VERSION, "fingerprint": fingerprint, "vocab_size": first["vocab_size"],
            "eos_id": first["eos_id"], "dtype": first["dtype"], "langs": langs, "tokenizer": first["tokenizer"],
            "tokenizer_hash": first["tokenizer_hash"], "files": files, "stats": stats,
            "val_fraction": first["val_fraction"], "near_dedup": first["near_dedup"],
            "decontamination": first["decontamination"], "contaminated": contaminated, "fim": first["fim"],
            "filters": {"params": first["filters"]["params"], "dropped": dropped,
                        "normalised": {k: sum(m["filters"]["normalised"][k] for m in metas) for k in ("bom", "crlf")}},
            "sources": sources, "seconds": round(seconds, 2), "mb_read": round(mb, 3),
            "mb_per_s": round(mb / max(seconds, 1e-9), 2),  # per machine: the shards' MB over their summed seconds
            "join": {"shards": n, "seconds": round(time.time() - t0, 2),
                     "dropped_across_shards": int((table["kept"] & drop).sum())}}
    tmp = out / f".meta.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / "meta.json")
    return meta
