"""The prepared data on disk, read side: meta.json and the token streams that data/prepare.py writes.

    meta = read_meta("data/web")                      # checked; DataError with the fix when not usable
    tokens = open_tokens("data/web", meta, "train", "xml")
    len(tokens), tokens[i:j], np.asarray(tokens)      # a memmap, or shards read as one array

One run writes {split}_{lang}.bin per stream. A sharded run (prepare.py --shard=I/N) writes
{split}_{lang}.{I:05d}.bin and shard.{I:05d}.json; joining the N shards writes {split}_{lang}.ranges.npy
(the kept token ranges of the shard files, in stream order) and meta.json, whose files[name]["shards"]
holds every shard file's token count. Either way meta.json comes last, so a directory without it
is never read.
"""
import json
from pathlib import Path

import numpy as np

VERSION = "3"  # 2: near-dedup and shards; 3: py and txt, decontamination, FIM sentinels


class DataError(ValueError):
    """A problem with prepared data or its inputs; the message is one line with the fix."""


POS_BITS = 40  # a document's position: source index << POS_BITS | its index in the source (file, line, doc)
LANGS = ["js", "md", "mdx", "py", "ts", "txt", "xml"]  # a shard's document table stores a language as its index here


def shard_meta_name(i):
    return f"shard.{i:05d}.json"


def shard_file_name(stream, i):
    return f"{stream}.{i:05d}.bin"


def docs_table_name(i):
    return f"docs.{i:05d}.npy"


def docs_table_dtype(n_keys):
    """One row per document of a shard that passed the filters, in position order; written ones have copies > 0."""
    return np.dtype([("pos", "u8"), ("keys", "u8", (n_keys,)), ("lang", "u1"), ("val", "?"),
                     ("kept", "?"),       # passed the shard's own deduplication
                     ("copies", "u4"),    # times written (train weight; val 1)
                     ("start", "u8"),     # first token in its stream's shard file
                     ("tokens", "u8"),    # tokens written, copies and EOS included
                     ("bytes", "u8")])    # UTF-8 bytes of one copy


def missing_shards(data_dir):
    """(N, indices of the missing shards) from the shard.*.json files present, or None when there are none."""
    found = {}
    for path in Path(data_dir).glob("shard.*.json"):
        try:
            i, n = json.loads(path.read_text())["shard"]
        except (ValueError, KeyError, TypeError):
            continue  # a damaged one counts as missing
        found[i] = n
    if not found:
        return None
    n = max(found.values())
    return n, [i for i in range(n) if found.get(i) != n]


def missing_shard_error(data_dir, n, missing):
    return DataError(f"{data_dir} holds {n - len(missing)} of {n} shards, shard {missing[0]} is missing: run "
                     f"data/prepare.py with --shard={missing[0]}/{n} and the arguments of the others")


def read_meta(data_dir):
    """meta.json of a prepared data directory (DataError when missing or malformed)."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        shards = missing_shards(data_dir)
        if shards and shards[1]:
            raise missing_shard_error(data_dir, *shards)
        if shards:
            raise DataError(f"{data_dir} holds all {shards[0]} shards but no meta.json: join them with "
                            f"`python data/prepare.py --merge --out {data_dir}`")
        raise DataError(f"{path} is missing: run `python data/prepare.py SRC --out {data_dir} ...` first")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}): re-run data/prepare.py")
    for key in ("vocab_size", "eos_id", "dtype", "langs", "tokenizer", "files"):
        if key not in meta:
            raise DataError(f"{path} has no {key!r}: it was not written by data/prepare.py; re-run it")
    local = Path(data_dir) / "tokenizer"
    if not Path(meta["tokenizer"]).is_dir() and local.is_dir():  # a trained tokenizer in a moved data dir
        meta["tokenizer"] = str(local.resolve())
    return meta


def data_tokenizer(meta):
    """The tokenizer of prepared data (its meta.json). transformers is imported here, when a tokenizer is needed,
    not when train.py starts: half a second of every training process's start."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(meta["tokenizer"], local_files_only=True)


def token_file(path, dtype, expected, fix):
    """Memory map of one .bin file holding `expected` tokens; `fix` says what to re-run."""
    if not path.is_file():
        raise DataError(f"{path} is missing: {fix}")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"{path} has {size} bytes, not a multiple of {dtype.itemsize} ({dtype.name}): "
                        f"the file is damaged; {fix}")
    if size // dtype.itemsize != expected:
        raise DataError(f"{path} holds {size // dtype.itemsize} tokens but meta.json says {expected}: {fix}")
    if size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def open_tokens(data_dir, meta, split, lang):
    """The {split}_{lang} token stream, checked against meta.json: a memmap, or Joined over shard files."""
    name = f"{split}_{lang}"
    if name not in meta["files"]:
        raise DataError(f"{data_dir} has no {split} data for language {lang!r} (it has {', '.join(meta['langs'])})")
    info, dtype, data_dir = meta["files"][name], np.dtype(meta["dtype"]), Path(data_dir)
    if "shards" not in info:
        return token_file(data_dir / f"{name}.bin", dtype, info["tokens"], "re-run data/prepare.py")
    n = len(info["shards"])
    files = [token_file(data_dir / shard_file_name(name, i), dtype, count,
                        f"re-run data/prepare.py with --shard={i}/{n} and the same arguments")
             if count else np.zeros(0, dtype=dtype) for i, count in enumerate(info["shards"])]
    path = data_dir / f"{name}.ranges.npy"
    if not path.is_file():
        raise DataError(f"{path} is missing: join the shards again with `python data/prepare.py --merge "
                        f"--out {data_dir}`")
    ranges = np.load(path)
    joined, sizes = Joined(files, ranges), np.array([len(f) for f in files])
    if len(joined) != info["tokens"] or (len(ranges) and (ranges[:, 0].max() >= n
                                                          or (ranges[:, 2] > sizes[ranges[:, 0]]).any())):
        raise DataError(f"{path} does not match the shard files: join them again with "
                        f"`python data/prepare.py --merge --out {data_dir}`")
    return joined


class Joined:
    """Ranges of shard files read as one token array: len(), slices with step 1, np.asarray()."""

    def __init__(self, files, ranges):
        self.files, self.ranges = files, ranges  # ranges: (k, 3) int64 rows [shard, start, stop]
        self.ends = np.cumsum(ranges[:, 2] - ranges[:, 1])
        self.dtype = files[0].dtype

    def __len__(self):
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, item):
        start, stop, _ = item.indices(len(self))
        parts = []
        i = int(np.searchsorted(self.ends, start, side="right"))  # the range holding token `start`
        while start < stop:
            shard, a, b = (int(x) for x in self.ranges[i])
            a += start - (int(self.ends[i]) - (b - a))
            n = min(stop - start, b - a)
            parts.append(self.files[shard][a:a + n])
            start, i = start + n, i + 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype=dtype)
