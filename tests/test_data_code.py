"""Data for a code model: The Stack's parquet and JSONL schema, the py/txt replay languages, decontamination and
the FIM sentinel tokens, on real files the install puts on disk and real pyarrow."""
import gzip
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

import data.prepare as prep
from data.format import DataError, read_meta
from data.sources import source_units
from evals.humaneval import problems

ROOT = Path(__file__).resolve().parent.parent
SITE = Path(sysconfig.get_paths()["purelib"])
# The Stack v1 (bigcode/the-stack-dedup): every column, in its order
STACK_V1 = ["hexsha", "size", "ext", "lang", "max_stars_repo_path", "max_stars_repo_name", "max_stars_repo_head_hexsha",
            "max_stars_repo_licenses", "max_stars_count", "max_stars_repo_stars_event_min_datetime",
            "max_stars_repo_stars_event_max_datetime", "max_issues_repo_path", "max_issues_repo_name",
            "max_issues_repo_head_hexsha", "max_issues_repo_licenses", "max_issues_count",
            "max_issues_repo_issues_event_min_datetime", "max_issues_repo_issues_event_max_datetime",
            "max_forks_repo_path", "max_forks_repo_name", "max_forks_repo_head_hexsha", "max_forks_repo_licenses",
            "max_forks_count", "max_forks_repo_forks_event_min_datetime", "max_forks_repo_forks_event_max_datetime",
            "content", "avg_line_length", "max_line_length", "alphanum_fraction"]
STACK_LANG = {".js": "JavaScript", ".mjs": "JavaScript", ".md": "Markdown", ".ts": "TypeScript", ".py": "Python",
              ".svg": "SVG", ".xml": "XML", ".txt": "Text", ".rst": "reStructuredText"}


@pytest.fixture
def tokdir(tiny_data):  # conftest.py: synthetic corpus with a trained 512-token BPE, prepared once
    return str(Path(tiny_data) / "tokenizer")


def real_files():
    """Files the install put on disk, of every language but MDX: JS, Markdown and TypeScript from the checkers' npm
    packages, Python from site-packages, SVG from matplotlib, text and reStructuredText from packages' metadata."""
    modules = ROOT / "checkers/node_modules"
    picks = [(modules / "micromark-core-commonmark", ("**/*.js",), 20), (modules, ("*/readme.md",), 8),
             (modules, ("*/index.d.ts",), 8), (SITE / "datasketch", ("*.py",), 14),
             (SITE / "matplotlib/mpl-data/images", ("*.svg",), 10),
             (SITE, ("*.dist-info/*.txt", "*.dist-info/*.rst"), 20)]
    files = []
    for base, globs, n in picks:
        found = sorted({p for g in globs for p in base.glob(g) if 200 < p.stat().st_size < 60_000})
        assert len(found) >= min(n, 5), f"the install should put {globs} files in {base}"
        files += found[:n]
    return files


def copy_tree(files, root):
    """The files under root, at names that keep their order and extensions."""
    for i, f in enumerate(files):
        (root / f"{i:03d}-{f.name}").parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, root / f"{i:03d}-{f.name}")
    return root


def write_stack_parquet(files, path, row_group_size=7, schema=STACK_V1):
    """A parquet file with The Stack v1's columns, one row per file, in several row groups."""
    rows = {c: [] for c in schema}
    for f in files:
        text = f.read_bytes().decode("utf-8")
        lines = text.splitlines() or [""]
        row = {"hexsha": f"{abs(hash(f.name)):040x}"[:40], "size": len(text.encode()), "ext": f.suffix[1:],
               "lang": STACK_LANG[f.suffix], "content": text, "max_stars_repo_path": f"src/{f.name}",
               "max_stars_repo_name": "octo/repo", "max_stars_repo_licenses": ["MIT"], "max_stars_count": 3,
               "avg_line_length": sum(map(len, lines)) / len(lines), "max_line_length": max(map(len, lines)),
               "alphanum_fraction": sum(c.isalnum() for c in text) / max(1, len(text))}
        for c in schema:
            rows[c].append(row.get(c, [] if c.endswith("licenses") else None))
    types = {c: pa.list_(pa.string()) if c.endswith("licenses") else pa.int64() if c in ("size", "max_stars_count",
             "max_issues_count", "max_forks_count", "max_line_length") else pa.float64() if c in (
             "avg_line_length", "alphanum_fraction") else pa.string() for c in schema}
    pq.write_table(pa.table({c: pa.array(rows[c], type=types[c]) for c in schema}), path,
                   row_group_size=row_group_size)
    return path


def streams(out):
    meta = read_meta(out)
    return {key: (Path(out) / f"{key}.bin").read_bytes() for key in meta["files"]}


# -- parquet and The Stack's schema --------------------------------------------------------------------------------

def test_the_stack_parquet_gives_the_documents_and_tokens_of_the_same_files(tmp_path, tokdir):
    files = real_files()
    tree = copy_tree(files, tmp_path / "tree")
    listed = source_units("dir", tree)  # the order a directory is read in, which the parquet's rows follow
    path = write_stack_parquet(listed, tmp_path / "train-00000-of-00001.parquet")
    assert pq.ParquetFile(path).metadata.num_row_groups == -(-len(listed) // 7) > 3
    a = prep.prepare([str(tree)], out=tmp_path / "dir", tokenizer=tokdir, val_fraction=0.2, workers=0, quiet=True)
    b = prep.prepare([str(path)], out=tmp_path / "pq", tokenizer=tokdir, val_fraction=0.2, workers=2, quiet=True)
    assert a["langs"] == b["langs"] == ["js", "md", "py", "ts", "txt", "xml"]
    assert a["stats"] == b["stats"] and a["filters"]["dropped"] == b["filters"]["dropped"]
    assert streams(tmp_path / "dir") == streams(tmp_path / "pq")  # the same tokens, byte for byte
    assert sum(s[x]["docs"] for s in b["stats"].values() for x in ("train", "val")) > 0.8 * len(files)
    # a directory of parquet files reads the same; 3 shards split it by row group and join to the same meta
    (tmp_path / "stack" / "data").mkdir(parents=True)
    shutil.copy(path, tmp_path / "stack" / "data")
    for i in (2, 0, 1):
        joined = prep.prepare([str(tmp_path / "stack")], out=tmp_path / "sh", tokenizer=tokdir, val_fraction=0.2,
                              workers=0, quiet=True, shard=f"{i}/3")
    assert joined["stats"] == b["stats"] and joined["filters"]["dropped"] == b["filters"]["dropped"]
    assert [json.loads((tmp_path / "sh" / f"shard.{i:05d}.json").read_text())["sources"][0]["docs_read"] > 0
            for i in range(3)] == [True] * 3


def test_language_from_the_columns_then_the_path(tmp_path, tokdir):
    js = (ROOT / "checkers/node_modules/micromark-core-commonmark/index.js").read_text()
    py, py2 = (SITE / "datasketch/minhash.py").read_text(), (SITE / "datasketch/lsh.py").read_text()
    table = pa.table({"content": [js, py, js + "\n// go\n", None, py2],
                      "language": ["JavaScript", "Python", "Go", "Python", None],
                      "path": ["a.js", "b.py", "c.go", "d.py", "pkg/e.py"]})
    pq.write_table(table, tmp_path / "v2.parquet")
    meta = prep.prepare([str(tmp_path / "v2.parquet")], out=tmp_path / "a", tokenizer=tokdir, workers=0, quiet=True)
    assert meta["filters"]["dropped"]["unknown_lang"] == 1 and meta["filters"]["dropped"]["bad_record"] == 1
    assert {lang: sum(s["docs"] for s in v.values()) for lang, v in meta["stats"].items()} == {"js": 1, "py": 2}
    # StarCoderData: no language column, the path says; JSONL with The Stack's fields reads the same
    pq.write_table(pa.table({"content": [js, py], "max_stars_repo_path": ["x/a.mjs", "y/b.py"]}),
                   tmp_path / "sc.parquet")
    rec = [{"content": js, "lang": "JavaScript"}, {"content": py, "max_stars_repo_path": "y/b.py"},
           {"text": "# Notes\n\nA plain *Markdown* file with words.\n", "language": "Markdown"}]
    with gzip.open(tmp_path / "dump.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rec)
    m2 = prep.prepare([str(tmp_path / "sc.parquet"), str(tmp_path / "dump.jsonl.gz")], out=tmp_path / "b",
                      tokenizer=tokdir, workers=0, quiet=True)
    assert m2["filters"]["dropped"]["duplicate"] == 2  # the JSONL's JS and Python are the parquet's
    assert {lang: sum(s["docs"] for s in v.values()) for lang, v in m2["stats"].items()} == {"js": 1, "md": 1, "py": 1}


def cli(*args):
    return subprocess.run([sys.executable, "data/prepare.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_parquet_without_text_column_is_a_one_line_error(tmp_path, tokdir):
    pq.write_table(pa.table({"blob_id": ["ab12"], "path": ["a.js"], "language": ["JavaScript"]}),
                   tmp_path / "v2.parquet")
    out = tmp_path / "out"
    prep.prepare(["synthetic:40"], out=out, tokenizer=tokdir, workers=0, quiet=True)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    r = cli(tmp_path / "v2.parquet", "--out", out, "--tokenizer", tokdir)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: parquet file {tmp_path / 'v2.parquet'} has no content or text column "
                               f"(its columns: blob_id, path, language)")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing lost
    # inside a directory beside other files (pyarrow's own test files in site-packages): skipped with a warning
    (tmp_path / "mixed").mkdir()
    shutil.copy(tmp_path / "v2.parquet", tmp_path / "mixed")
    shutil.copy(SITE / "datasketch/minhash.py", tmp_path / "mixed")
    r = cli(tmp_path / "mixed", "--out", tmp_path / "mixed_out", "--tokenizer", tokdir)
    assert r.returncode == 0, r.stderr
    assert "warning: parquet file" in r.stderr and "skipped" in r.stderr
    assert read_meta(tmp_path / "mixed_out")["langs"] == ["py"]


# -- replay languages ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_replay_mixture_logs_val_loss_of_py_and_txt(tmp_path, tokdir):
    from helpers import QUICK, read_jsonl, run_train
    tree = copy_tree([f for f in real_files() if f.suffix in (".py", ".txt", ".rst")], tmp_path / "replay")
    meta = prep.prepare(["synthetic:300", str(tree)], out=tmp_path / "data", tokenizer=tokdir, val_fraction=0.25,
                        workers=0, quiet=True)
    assert {"py", "txt"} <= set(meta["langs"]) and meta["stats"]["txt"]["val"]["docs"] > 0
    mix = '{"xml": .35, "mdx": .15, "js": .35, "py": .10, "txt": .05}'
    run_train([*QUICK, f"--out_dir={tmp_path / 'run'}", f"--data_dir={tmp_path / 'data'}", f"--mixture={mix}",
               "--max_iters=4", "--eval_interval=2"])
    evals = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert r["val_loss/py"] > 0 and r["val_loss/txt"] > 0 and r["val_loss/xml"] > 0, r


# -- decontamination ----------------------------------------------------------------------------------------------

def planted(root):
    """HumanEval/0's prompt reformatted, in a Python file (other indentation and line breaks) and in a JS comment;
    returns their names."""
    prompt = problems()[0]["prompt"]
    words = prompt.split()
    py = "\n".join("  " + " ".join(words[i:i + 7]) for i in range(0, len(words), 7))
    (root / "planted_copy.py").write_text("import math\n\n\n" + py.replace('  """', '"""') + "\n    return False\n")
    body = "\n".join(" * " + " ".join(words[i:i + 9]) for i in range(0, len(words), 9))
    (root / "planted_note.js").write_text(f"/**\n{body}\n */\nexport function closeEnough(xs, t) {{\n"
                                          f"  return false;\n}}\n")
    return {"planted_copy.py", "planted_note.js"}


def kept_names(meta, out, tokdir):
    """The planted names still present in the prepared streams."""
    tok = AutoTokenizer.from_pretrained(meta["tokenizer"])
    text = "".join(tok.decode(np.frombuffer(b, dtype=meta["dtype"]).tolist()) for b in streams(out).values())
    return {"planted_copy.py": "has_close_elements" in text, "planted_note.js": "closeEnough" in text}


def test_decontamination_drops_planted_benchmark_text_and_nothing_else(tmp_path, tokdir, capsys):
    tree = copy_tree(real_files(), tmp_path / "tree")
    names = planted(tree)
    clean = prep.prepare([str(tree)], out=tmp_path / "off", tokenizer=tokdir, workers=0, quiet=True,
                         decontaminate=["none"])
    assert clean["decontamination"] == "off" and clean["filters"]["dropped"]["contaminated"] == 0
    assert kept_names(clean, tmp_path / "off", tokdir) == dict.fromkeys(names, True)
    meta = prep.prepare([str(tree)], out=tmp_path / "on", tokenizer=tokdir, workers=2, quiet=True)
    assert meta["filters"]["dropped"]["contaminated"] == 2
    assert meta["contaminated"]["humaneval"]["docs"] == 2 and meta["contaminated"]["js_problems"]["docs"] == 0
    assert {Path(p).name for p in meta["contaminated"]["humaneval"]["paths"]} == names
    assert kept_names(meta, tmp_path / "on", tokdir) == dict.fromkeys(names, False)
    docs = lambda m: sum(s[x]["docs"] for s in m["stats"].values() for x in ("train", "val"))  # noqa: E731
    assert docs(meta) == docs(clean) - 2  # no clean file went
    assert meta["decontamination"]["ngram"] == 13
    assert meta["decontamination"]["benchmarks"]["humaneval"]["texts"] == 2 * 164
    from data import decontam  # the audit command names the same two, and the words they share with HumanEval/0
    decontam.main([str(tree), "--ngram", "13"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"13-grams: 2 of {docs(clean) + sum(clean['filters']['dropped'].values())} documents")
    assert {Path(line.split(":")[0].strip()).name for line in printed[1:]} == names
    assert all("humaneval: 'check if in given list of numbers" in line or "has_close_elements" in line
               for line in printed[1:]), printed


def test_decontaminate_files_jsonl_and_plain_text(tmp_path, tokdir):
    tree = copy_tree(real_files()[:12], tmp_path / "tree")
    mbpp = {"task_id": 3, "text": "Write a python function to identify non-prime numbers.",
            "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in "
                    "range(2,int(math.sqrt(n)) + 1):\r\n        if n % i == 0:\r\n            result = True\r\n"
                    "    return result",
            "test_list": ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True"]}
    (tmp_path / "mbpp.jsonl").write_text(json.dumps(mbpp) + "\n")
    secret = "the quarterly ledger reconciles every account against the audited balance sheet before the close"
    (tmp_path / "heldout.txt").write_text(secret + "\n")
    (tree / "copied.py").write_text("# from a blog\n" + mbpp["code"].replace("\r\n", "\n").replace("    ", "  ")
                                    + "\n\nprint(is_not_prime(7))\n")
    (tree / "notes.md").write_text(f"# Notes\n\nAs written: {secret.upper()}.\n")
    meta = prep.prepare([str(tree)], out=tmp_path / "out", tokenizer=tokdir, workers=0, quiet=True,
                        decontaminate=[str(tmp_path / "mbpp.jsonl"), str(tmp_path / "heldout.txt")])
    hits = {name: v["docs"] for name, v in meta["contaminated"].items()}
    assert hits == {"humaneval": 0, "js_problems": 0, str(tmp_path / "mbpp.jsonl"): 1, str(tmp_path / "heldout.txt"): 1}
    assert meta["decontamination"]["benchmarks"][str(tmp_path / "mbpp.jsonl")]["texts"] == 2  # text and code


@pytest.mark.parametrize("files, message", [
    (["MISSING"], "cannot read --decontaminate MISSING"),
    (["BAD.jsonl"], "line 2 has none of the fields prompt, text, question, canonical_solution"),
    (["none", "BAD.jsonl"], "--decontaminate=none turns decontamination off: give it alone"),
])
def test_bad_decontaminate_input_is_a_one_line_error_and_writes_nothing(tmp_path, tokdir, capsys, files, message):
    (tmp_path / "BAD.jsonl").write_text('{"prompt": "def f(): pass"}\n{"tests": ["x"]}\n')
    files = [str(tmp_path / f) if f != "none" else f for f in files]
    message = message.replace("MISSING", str(tmp_path / "MISSING"))
    args = [a for f in files for a in ("--decontaminate", f)]
    with pytest.raises(SystemExit) as e:
        prep.main(["synthetic:20", "--out", str(tmp_path / "out"), "--tokenizer", tokdir, *args])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


# -- FIM sentinels in the tokenizer -------------------------------------------------------------------------------

def phi2_like(tmp_path, rows=None):
    """A model directory as phi-2's: a byte-level BPE without sentinels, added tokens for runs of spaces, and a
    config.json whose vocab_size is the embedding's rows (the tokenizer's length when rows is None)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from data.synth import generate_doc
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([generate_doc(i)[1] for i in range(100)], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    hf.add_tokens([" " * n for n in range(2, 8)])
    d = tmp_path / "phi2_like"
    hf.save_pretrained(d)
    (d / "config.json").write_text(json.dumps({"model_type": "phi", "vocab_size": rows or len(hf)}))
    return d, len(hf)


def test_sentinels_take_free_embedding_rows_without_a_resize(tmp_path, tokdir):
    d, n = phi2_like(tmp_path, rows=448)
    assert "<fim_middle>" not in AutoTokenizer.from_pretrained(d).get_vocab()
    meta = prep.prepare(["synthetic:40"], out=tmp_path / "out", tokenizer=str(d), workers=0, quiet=True)
    assert meta["fim"] == {"prefix": n, "middle": n + 1, "suffix": n + 2} and meta["vocab_size"] == n + 3 <= 448
    assert meta["tokenizer"] == str((tmp_path / "out" / "tokenizer").resolve())  # kept with the data
    tok = AutoTokenizer.from_pretrained(meta["tokenizer"])
    assert tok.convert_tokens_to_ids("<fim_suffix>") == n + 2
    assert tok.decode([n, 5, n + 2], skip_special_tokens=True) == tok.decode([5])  # special: decoding can drop them
    assert json.loads((d / "config.json").read_text())["vocab_size"] == 448  # the model is not touched
    # a document that quotes a sentinel keeps it as text, not as the sentinel's id
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "fim.js").write_text("const parts = ['<fim_prefix>', '<fim_middle>'].join('');\n")
    m2 = prep.prepare([str(tmp_path / "src")], out=tmp_path / "out2", tokenizer=str(d), workers=0, quiet=True)
    ids = np.concatenate([np.frombuffer(b, dtype=m2["dtype"]) for b in streams(tmp_path / "out2").values()])
    assert not set(m2["fim"].values()) & set(ids.tolist())


@pytest.mark.slow
def test_tokenizer_without_free_rows_is_a_one_line_error(tmp_path, tokdir):
    d, n = phi2_like(tmp_path)
    r = cli("synthetic:20", "--out", tmp_path / "out", "--tokenizer", d)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: tokenizer {d} has {n} tokens and its model {n} embedding rows: no free row "
                               f"for the 3 FIM sentinels; resize the model's embeddings to at least {n + 3} rows")
    assert "--no-fim-tokens" in r.stderr and not (tmp_path / "out").exists()
    r = cli("synthetic:20", "--out", tmp_path / "out", "--tokenizer", d, "--no-fim-tokens")
    assert r.returncode == 0, r.stderr
    meta = read_meta(tmp_path / "out")
    assert meta["fim"] is None and meta["vocab_size"] == n and meta["tokenizer"] == str(d)
