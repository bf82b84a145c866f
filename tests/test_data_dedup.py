"""Near-duplicate removal (data/dedup.py through data/prepare.py): planted near-copies go, distinct files stay."""
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

import data.prepare as prep
from data import dedup
from data.format import open_tokens, read_meta
from data.synth import generate_doc

EXT = {"xml": ".xml", "mdx": ".mdx", "js": ".js"}
BASES = 12  # long documents, 4 per language, each with 3 near-copies
EXACT = 2   # exact copies of bases
DISTINCT = 30  # short synthetic documents unlike any other


@pytest.fixture
def tokdir(tiny_data):  # conftest.py: synthetic corpus with a trained 512-token BPE, prepared once
    return str(Path(tiny_data) / "tokenizer")


def long_doc(lang, seed, parts=12):
    """A long document of one language: several synthetic ones of that language, one after another."""
    docs = (text for i in range(1000) for lg, text in [generate_doc(i, seed)] if lg == lang)
    return "\n".join(next(docs) for _ in range(parts))


def near_copies(text):
    """Three edits that keep a document a near-copy: whitespace reformatted, one identifier renamed throughout,
    one line changed."""
    spaced = re.sub(r"\n", "\n\n", text).replace("  ", "    ").replace("=", " = ")
    counts = {}
    for w in re.findall(r"[A-Za-z_]\w{3,}", text):
        counts[w] = counts.get(w, 0) + 1
    rare = min((c, w) for w, c in counts.items() if c >= 2)[1]
    renamed = re.sub(rf"\b{rare}\b", "renamedIdentifier", text)
    lines = text.split("\n")
    lines[len(lines) // 2] = "const changedLine = computeSomethingElse(42); // edited by hand"
    return {"ws": spaced, "rename": renamed, "line": "\n".join(lines)}


def planted_corpus(root):
    """Bases (a_*), their near-copies and exact copies (b_*), distinct documents (c_*). Names sort bases first, so
    a base is the earlier document of its pair and stays. -> {name: text} of each group."""
    root.mkdir(parents=True, exist_ok=True)
    bases, copies, exact, distinct = {}, {}, {}, {}
    for k in range(BASES):
        lang = ("js", "xml", "mdx")[k % 3]
        bases[f"a_base{k:02d}{EXT[lang]}"] = text = long_doc(lang, 100 + k)
        for kind, variant in near_copies(text).items():
            copies[f"b_copy{k:02d}_{kind}{EXT[lang]}"] = variant
        if k < EXACT:
            exact[f"b_exact{k:02d}{EXT[lang]}"] = text
    for i in range(DISTINCT):
        lang, text = generate_doc(i, 7)
        distinct[f"c_doc{i:02d}{EXT[lang]}"] = text
    for group in (bases, copies, exact, distinct):
        for name, text in group.items():
            (root / name).write_text(text)
    return bases, copies, exact, distinct


def jaccard(a, b):
    sa, sb = set(dedup.shingles(a.encode())), set(dedup.shingles(b.encode()))
    return len(sa & sb) / len(sa | sb)


def kept_texts(out, tokdir):
    tok, meta = AutoTokenizer.from_pretrained(tokdir), read_meta(out)
    texts = []
    for key in meta["files"]:
        ids = np.asarray(open_tokens(out, meta, *key.split("_")))
        ends = np.flatnonzero(ids == meta["eos_id"])
        texts += [tok.decode(ids[a:b].tolist()) for a, b in zip(np.r_[0, ends[:-1] + 1], ends)]
    return texts


def test_planted_near_copies_are_removed_and_distinct_files_kept(tmp_path, tokdir):
    bases, copies, exact, distinct = planted_corpus(tmp_path / "src")
    # the corpus is what it claims: copies close to their base, distinct documents far from everything
    sims = {name: jaccard(bases[f"a_base{name[6:8]}{Path(name).suffix}"], text) for name, text in copies.items()}
    assert min(sims.values()) >= 0.9, sims
    assert all(jaccard(a, b) < 0.5 for a in distinct.values() for b in list(bases.values()) + list(distinct.values())
               if a is not b)
    meta = prep.prepare([str(tmp_path / "src")], out=tmp_path / "out", tokenizer=tokdir, val_fraction=0.2, workers=0,
                        quiet=True)
    dropped = meta["filters"]["dropped"]
    # LSH finds a pair of Jaccard >= 0.9 with probability >= 0.85 (1.0 for the reformatted ones, whose words are
    # the same): at least 90% of the planted near-copies must go; whitespace-only copies always
    assert dropped["duplicate"] == EXACT
    assert 0.9 * len(copies) <= dropped["near_duplicate"] <= len(copies)
    kept = kept_texts(tmp_path / "out", tokdir)
    assert sorted(t for t in kept if t in bases.values() or t in distinct.values()) == sorted(
        list(bases.values()) + list(distinct.values()))  # every base and distinct document stays, once
    assert not any(t in kept for name, t in copies.items() if name.endswith(("_ws.js", "_ws.xml", "_ws.mdx")))
    assert len(kept) == len(bases) + len(distinct) + len(copies) - dropped["near_duplicate"]
    # no two kept documents share a key: no near-copy straddles train and val
    keys = [dedup.keys(t.encode(), hashlib.sha256(t.encode()).digest(),
                       (meta["near_dedup"]["bands"], meta["near_dedup"]["rows"])) for t in kept]
    flat = np.concatenate(keys)
    assert len(np.unique(flat)) == len(flat)


def test_near_dedup_off_keeps_near_copies(tmp_path, tokdir):
    bases, copies, exact, distinct = planted_corpus(tmp_path / "src")
    meta = prep.prepare([str(tmp_path / "src")], out=tmp_path / "out", tokenizer=tokdir, workers=0, quiet=True,
                        near_dedup=0)
    assert meta["filters"]["dropped"]["duplicate"] == EXACT and meta["filters"]["dropped"]["near_duplicate"] == 0
    assert meta["near_dedup"] == {"threshold": 0}
    assert sum(s[x]["docs"] for s in meta["stats"].values() for x in ("train", "val")) == (
        len(bases) + len(copies) + len(distinct))


def test_rule_an_earlier_document_sharing_a_key_drops_it():
    # rows [content key, band 1, band 2] of A, B, C, D: A and B meet in band 1, B and C in band 2, D is A again
    pos = np.array([10, 20, 30, 40], dtype=np.uint64)
    keys = np.array([[1, 100, 300], [2, 100, 201], [3, 102, 201], [1, 100, 300]], dtype=np.uint64)
    exact, near = dedup.later_copies(pos, keys)
    assert exact.tolist() == [False, False, False, True]
    assert near.tolist() == [False, True, True, False]  # C goes too: B, dropped, was earlier (kept or not)
    order = np.array([3, 1, 0, 2])  # the rule depends on positions, not on the order rows arrive in
    e2, n2 = dedup.later_copies(pos[order], keys[order])
    assert e2.tolist() == exact[order].tolist() and n2.tolist() == near[order].tolist()


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_bad_threshold_is_one_line_error(tmp_path, capsys, tokdir, value):
    with pytest.raises(SystemExit) as e:
        prep.main(["synthetic:5", "--out", str(tmp_path / "o"), "--tokenizer", tokdir, f"--near-dedup={value}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: --near-dedup {value} is not a Jaccard threshold in (0, 1)")
