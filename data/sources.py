"""Where documents come from: directories, parquet files (The Stack, StarCoderData), .jsonl(.gz) files and the
synthetic corpus, read in units that shards split between them.

    kind, target, weight = parse_source("corpus/js@2")
    units = source_units(kind, target)       # files and parquet row groups, one .jsonl file, or synthetic documents
    for index, name, lang, raw in read_docs(kind, target, units, counts, mine=lambda j: j % 4 == 1): ...

A parquet file is read one row group at a time, only the columns it needs: the text from `content` (The Stack,
StarCoderData) or `text`; the language from `lang` or `language` (The Stack's "JavaScript", "Python", ...), else
from the extension of `path` or `max_stars_repo_path`, else the row counts as unknown_lang. JSONL records are read
the same way. A directory's parquet files are read beside its other files; one without a text column is skipped
with a warning there (pyarrow's own test files sit in site-packages), and is an error when given as a source.
"""
import gzip
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from data.format import LANGS, DataError

EXTENSIONS = {
    "xml": ".xml .xsd .xsl .xslt .svg .rss .atom .plist .csproj .xaml".split(),
    "mdx": [".mdx"], "md": [".md"],
    "js": ".js .mjs .cjs .jsx".split(), "ts": ".ts .tsx".split(),
    "py": [".py"], "txt": [".txt", ".rst"],  # replay: phi-2's Python and English, against forgetting
}
LANG_OF_EXT = {ext: lang for lang, exts in EXTENSIONS.items() for ext in exts}
EXTENSION_TUPLE = (*LANG_OF_EXT, ".parquet")
# a lang/language column's values (The Stack v1 and v2 use GitHub Linguist's names), lowercased
LANG_ALIASES = {"javascript": "js", "typescript": "ts", "markdown": "md", "svg": "xml", "jsx": "js", "tsx": "ts",
                "python": "py", "text": "txt", "restructuredtext": "txt"}
TEXT_COLUMNS = ("content", "text")  # the first present holds the document
LANG_COLUMNS = ("lang", "language")
PATH_COLUMNS = ("path", "max_stars_repo_path")
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
        raise DataError(f"source {src} does not exist: pass a directory, a .parquet or .jsonl(.gz) file, "
                        f"or synthetic:N")
    if path.is_dir():
        return "dir", path, weight
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl", path, weight
    if path.suffix == ".parquet":
        return "parquet", path, weight
    raise DataError(f"source {src} is a file but not .parquet, .jsonl or .jsonl.gz: pass its directory instead")


@dataclass(frozen=True)
class RowGroup:
    """One row group of a parquet file: a unit of its source, as a file is."""
    path: Path
    group: int        # its index in the file
    rows: int
    text_bytes: int   # uncompressed size of its text column (the progress bar's total)
    columns: tuple    # (text, lang or None, path or None): the columns read


def parquet_units(path, in_dir):
    """The row groups of a parquet file; [] with a warning for one without a text column inside a directory."""
    import pyarrow.parquet as pq
    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError and more for a file that is not parquet
        raise DataError(f"cannot read parquet file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    names = meta.schema.names
    text = next((c for c in TEXT_COLUMNS if c in names), None)
    if text is None:
        why = (f"parquet file {path} has no {' or '.join(TEXT_COLUMNS)} column (its columns: {', '.join(names)})")
        if in_dir:
            print(f"warning: {why}: skipped", file=sys.stderr)
            return []
        raise DataError(f"{why}: give the file whose column holds the documents' text")
    columns = (text, next((c for c in LANG_COLUMNS if c in names), None), next((c for c in PATH_COLUMNS if c in names),
                                                                                None))
    at = names.index(text)
    return [RowGroup(path, g, meta.row_group(g).num_rows, meta.row_group(g).column(at).total_uncompressed_size,
                     columns) for g in range(meta.num_row_groups)]


def dir_units(path):
    """A directory's corpus files and the row groups of its parquet files, in sorted order."""
    units = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        # str.endswith first, a Path only for corpus files: a site-packages tree lists 75k other names
        for n in sorted(names):
            if n.lower().endswith(EXTENSION_TUPLE):
                suffix = Path(n).suffix.lower()
                if suffix == ".parquet":
                    units += parquet_units(Path(root, n), in_dir=True)
                elif suffix in LANG_OF_EXT:
                    units.append(Path(root, n))
    if not units:
        raise DataError(f"source {path} holds no readable files with a known extension "
                        f"({' '.join(sorted(EXTENSION_TUPLE))})")
    return units


def source_units(kind, target):
    """The units a source is split into across shards: files and parquet row groups, one .jsonl(.gz) file, or
    synthetic documents."""
    if kind == "dir":
        return dir_units(target)
    if kind == "parquet":
        return parquet_units(target, in_dir=False)
    return [target] if kind == "jsonl" else range(target)


def unit_size(unit):
    """Bytes of text a unit holds, for the progress bar (a row group's is its text column's, uncompressed)."""
    return unit.text_bytes if isinstance(unit, RowGroup) else unit.stat().st_size


def source_stamp(kind, target, units, mine):
    """What identifies a source's content for the up-to-date check (sizes and mtimes, not contents)."""
    if kind == "synthetic":
        return hashlib.sha256(Path(__file__).with_name("synth.py").read_bytes()).hexdigest()
    h = hashlib.sha256()
    for j, u in enumerate(units):
        if mine(j):
            f, tail = (u.path, f"#{u.group}") if isinstance(u, RowGroup) else (u, "")
            st = f.stat()
            name = f.relative_to(target) if kind == "dir" else f.name
            h.update(f"{name}{tail}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def record_lang(lang, path):
    """Our language of a record: its lang/language value (The Stack's names too), else its path's extension;
    "" when neither says."""
    lang = str(lang or "").lower()
    lang = LANG_ALIASES.get(lang, lang)
    if not lang and isinstance(path, str):
        lang = LANG_OF_EXT.get(Path(path).suffix.lower(), "")
    return lang


def jsonl_lang(rec):
    return record_lang(rec.get("lang") or rec.get("language"),
                       next((rec[c] for c in PATH_COLUMNS if isinstance(rec.get(c), str)), None))


def unit_docs(units, counts, mine):
    """(index, name, lang, raw) of the files and parquet rows in the units `mine` accepts; a document's index is its
    place among all the units' files and rows, so it does not depend on the shard."""
    import pyarrow.parquet as pq
    base, opened = 0, (None, None)
    for j, u in enumerate(units):
        if not isinstance(u, RowGroup):  # a directory's plain file: one index
            if mine(j):
                yield base, str(u), LANG_OF_EXT[u.suffix.lower()], u.read_bytes()
            base += 1
            continue
        if mine(j):
            if opened[0] != u.path:
                opened = u.path, pq.ParquetFile(u.path)
            text_col, lang_col, path_col = u.columns
            try:
                table = opened[1].read_row_group(u.group, columns=[c for c in u.columns if c])
            except Exception as e:
                raise DataError(f"cannot read row group {u.group} of {u.path}: {str(e).splitlines()[0]}")
            texts = table.column(text_col).to_pylist()
            langs = table.column(lang_col).to_pylist() if lang_col else [None] * len(texts)
            paths = table.column(path_col).to_pylist() if path_col else [None] * len(texts)
            for k, (text, lang, path) in enumerate(zip(texts, langs, paths)):
                if not isinstance(text, (str, bytes)):  # a null (bytes: a binary column, decoded as files are)
                    counts["bad_record"] += 1
                    continue
                lang = record_lang(lang, path)
                if lang not in EXTENSIONS:
                    counts["unknown_lang"] += 1
                    continue
                yield base + k, f"{u.path}:{base + k}" + (f":{path}" if path else ""), lang, text
        base += u.rows


def read_docs(kind, target, units, counts, mine=lambda unit: True):
    """Yield (index, name, lang, raw) of the units `mine` accepts; raw is bytes (files) or str (parquet, JSONL,
    synthetic), index the document's place in its source (file or parquet row, line, synthetic document)."""
    if kind == "synthetic":
        from data.synth import generate_doc
        for i in units:
            if mine(i):
                yield i, f"synthetic:{i}", *generate_doc(i)
    elif kind in ("dir", "parquet"):
        yield from unit_docs(units, counts, mine)
    elif mine(0):
        opener = gzip.open if target.name.endswith(".gz") else open
        try:
            with opener(target, "rb") as fh:
                for n, line in enumerate(fh, 1):
                    try:
                        rec = json.loads(line)
                        text, lang = next(rec[c] for c in TEXT_COLUMNS if c in rec), jsonl_lang(rec)
                        if not isinstance(text, str):
                            raise TypeError
                    except (ValueError, StopIteration, TypeError, AttributeError):  # not JSON, no text, not a dict
                        counts["bad_record"] += 1
                        continue
                    if lang not in EXTENSIONS:
                        counts["unknown_lang"] += 1
                        continue
                    yield n, f"{target}:{n}", lang, text
        except (OSError, EOFError) as e:
            raise DataError(f"cannot read {target}: {e}")
