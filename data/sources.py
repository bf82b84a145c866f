"""Where documents come from: directories, .jsonl(.gz) files and the synthetic corpus, read in units that
shards split between them.

    kind, target, weight = parse_source("corpus/js@2")
    units = source_units(kind, target)                  # files, one .jsonl file, or synthetic documents
    for index, name, lang, raw in read_docs(kind, target, units, counts, mine=lambda j: j % 4 == 1): ...
"""
import gzip
import hashlib
import json
import os
from pathlib import Path

from data.format import LANGS, DataError

EXTENSIONS = {
    "xml": ".xml .xsd .xsl .xslt .svg .rss .atom .plist .csproj .xaml".split(),
    "mdx": [".mdx"], "md": [".md"],
    "js": ".js .mjs .cjs .jsx".split(), "ts": ".ts .tsx".split(),
}
LANG_OF_EXT = {ext: lang for lang, exts in EXTENSIONS.items() for ext in exts}
EXTENSION_TUPLE = tuple(LANG_OF_EXT)
LANG_ALIASES = {"javascript": "js", "typescript": "ts", "markdown": "md", "svg": "xml", "jsx": "js", "tsx": "ts"}
SKIP_DIRS = {"node_modules", ".git", ".hg", ".svn"}  # vendored or VCS internals, never corpus files
assert sorted(EXTENSIONS) == LANGS  # shard tables store a language as its index in LANGS
SYNTHETIC_DOCS = 1500  # `synthetic` alone: ~1M train tokens with a 2048-token BPE, prepared in seconds


def parse_source(src):
    """'path[@weight]' or 'synthetic[:N][@weight]' -> (kind, target, weight)."""
    weight = 1.0
    head, at, tail = src.rpartition("@")
    if at and not Path(src).exists():
        try:
            weight = float(tail)
        except ValueError:
            raise DataError(f"source {src!r}: the weight after '@' must be a number, e.g. {head}@0.5")
        if weight <= 0:
            raise DataError(f"source {src!r}: the weight must be > 0")
        src = head
    if src == "synthetic" or src.startswith("synthetic:"):
        n = src.partition(":")[2] or str(SYNTHETIC_DOCS)
        if not n.isdigit() or int(n) < 1:
            raise DataError(f"source {src!r}: write synthetic:N with N a positive number of documents")
        return "synthetic", int(n), weight
    path = Path(src).expanduser()
    if not path.exists():
        raise DataError(f"source {src} does not exist: pass a directory, a .jsonl(.gz) file or synthetic:N")
    if path.is_dir():
        return "dir", path, weight
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl", path, weight
    raise DataError(f"source {src} is a file but not .jsonl or .jsonl.gz: pass its directory instead")


def dir_files(path):
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        # str.endswith first, a Path only for corpus files: a site-packages tree lists 75k other names
        files += [Path(root, n) for n in sorted(names) if n.lower().endswith(EXTENSION_TUPLE)
                  and Path(n).suffix.lower() in LANG_OF_EXT]
    if not files:
        raise DataError(f"source {path} holds no files with a known extension ({' '.join(sorted(LANG_OF_EXT))})")
    return files


def source_units(kind, target):
    """The units a source is split into across shards: its files, one .jsonl(.gz) file, or synthetic documents."""
    return dir_files(target) if kind == "dir" else [target] if kind == "jsonl" else range(target)


def source_stamp(kind, target, units, mine):
    """What identifies a source's content for the up-to-date check (sizes and mtimes, not contents)."""
    if kind == "synthetic":
        return hashlib.sha256(Path(__file__).with_name("synth.py").read_bytes()).hexdigest()
    h = hashlib.sha256()
    for j, f in enumerate(units):
        if mine(j):
            st = f.stat()
            h.update(f"{f.relative_to(target) if kind == 'dir' else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def jsonl_lang(rec):
    lang = str(rec.get("lang") or rec.get("language") or "").lower()
    lang = LANG_ALIASES.get(lang, lang)
    if not lang and isinstance(rec.get("path"), str):
        lang = LANG_OF_EXT.get(Path(rec["path"]).suffix.lower(), "")
    return lang


def read_docs(kind, target, units, counts, mine=lambda unit: True):
    """Yield (index, name, lang, raw) of the units `mine` accepts; raw is bytes (files) or str (JSONL,
    synthetic), index the document's place in its source (file, line or synthetic document)."""
    if kind == "synthetic":
        from data.synth import generate_doc
        for i in units:
            if mine(i):
                yield i, f"synthetic:{i}", *generate_doc(i)
    elif kind == "dir":
        for j, f in enumerate(units):
            if mine(j):
                yield j, str(f), LANG_OF_EXT[f.suffix.lower()], f.read_bytes()
    elif mine(0):
        opener = gzip.open if target.name.endswith(".gz") else open
        try:
            with opener(target, "rb") as fh:
                for n, line in enumerate(fh, 1):
                    try:
                        rec = json.loads(line)
                        text, lang = rec["text"], jsonl_lang(rec)
                        if not isinstance(text, str):
                            raise TypeError
                    except (ValueError, KeyError, TypeError):
                        counts["bad_record"] += 1
                        continue
                    if lang not in EXTENSIONS:
                        counts["unknown_lang"] += 1
                        continue
                    yield n, f"{target}:{n}", lang, text
        except (OSError, EOFError) as e:
            raise DataError(f"cannot read {target}: {e}")
