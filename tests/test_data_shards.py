"""prepare.py --shard=I/N and the join: N = 3 gives what N = 1 gives; killed shards, bad input; training on shards."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

import data.prepare as prep
from data.format import open_tokens, read_meta
from data.loader import DataError, TokenLoader
from helpers import QUICK, run_train, train_losses
from test_data_dedup import planted_corpus


@pytest.fixture(scope="module")
def corpus(tiny_data, tmp_path_factory):
    """The planted corpus (exact and near copies, which land in other shards than their originals), its tokenizer,
    and its single-run preparation, the reference every sharded one must equal."""
    root = tmp_path_factory.mktemp("shards")
    bases = planted_corpus(root / "src")[0]
    (root / "src" / "d_exact.js").write_text(bases["a_base00.js"])  # file 80 goes to shard 2, its original to 0
    tok = str(Path(tiny_data) / "tokenizer")
    meta = prep.prepare([str(root / "src")], out=root / "n1", tokenizer=tok, val_fraction=0.2, workers=0, quiet=True)
    return root, tok, meta


def shard(corpus, out, i, n=3, **kw):
    root, tok, _ = corpus
    return prep.prepare([str(root / "src")], out=out, tokenizer=tok, val_fraction=0.2, workers=kw.pop("workers", 0),
                        quiet=True, shard=f"{i}/{n}", **kw)


def documents(out, tok):
    """{stream: sorted decoded documents}, read through data/format.py as the loader reads."""
    tok, meta = AutoTokenizer.from_pretrained(tok), read_meta(out)
    docs = {}
    for key in meta["files"]:
        ids = np.asarray(open_tokens(out, meta, *key.split("_")))
        ends = np.flatnonzero(ids == meta["eos_id"])
        docs[key] = sorted(tok.decode(ids[a:b].tolist()) for a, b in zip(np.r_[0, ends[:-1] + 1], ends))
    return docs


def assert_same_result(out, corpus):
    root, tok, ref = corpus
    meta = read_meta(out)
    assert documents(out, tok) == documents(root / "n1", tok)  # the same documents in the same split
    assert meta["stats"] == ref["stats"] and meta["langs"] == ref["langs"]  # docs, tokens and bytes per language
    assert meta["filters"]["dropped"] == ref["filters"]["dropped"] and meta["sources"] == ref["sources"]
    assert {k: v["tokens"] for k, v in meta["files"].items()} == {k: v["tokens"] for k, v in ref["files"].items()}


def test_three_shards_equal_one_run(corpus, tmp_path):
    out = tmp_path / "n3"
    assert shard(corpus, out, 2) is None and shard(corpus, out, 0, workers=2) is None  # any order, any workers
    with pytest.raises(DataError, match="holds 2 of 3 shards, shard 1 is missing: run data/prepare.py with "
                                        "--shard=1/3"):
        TokenLoader(out, 2, 16)
    meta = shard(corpus, out, 1)  # completes the set: this run joins it
    assert_same_result(out, corpus)
    local = [json.loads((out / f"shard.{i:05d}.json").read_text())["filters"]["dropped"] for i in range(3)]
    for kind in ("duplicate", "near_duplicate"):  # copies met across shards, and the join dropped them
        assert sum(d[kind] for d in local) < meta["filters"]["dropped"][kind]
    assert meta["join"]["dropped_across_shards"] == sum(
        meta["filters"]["dropped"][k] - sum(d[k] for d in local) for k in ("duplicate", "near_duplicate"))
    assert sorted(p.name for p in out.glob("train_js*")) == [
        "train_js.00000.bin", "train_js.00001.bin", "train_js.00002.bin", "train_js.ranges.npy"]
    # the loader reads the shards as one stream; a re-run finds every shard up to date and the join done
    x, y = TokenLoader(out, 2, 16, mixture={"js": 1.0}).next_batch()
    assert torch_equal_shift(x, y)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert shard(corpus, out, 0) == meta
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp


def torch_equal_shift(x, y):
    return bool((x[:, 1:] == y[:, :-1]).all())


def test_killed_shard_leaves_nothing_the_loader_reads(corpus, tmp_path, monkeypatch):
    out = tmp_path / "n3"
    shard(corpus, out, 0)
    shard(corpus, out, 2)
    calls = []

    def killed(chunk):  # the third chunk never comes back, as if the machine died
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(chunk)
    real = prep._work
    monkeypatch.setattr(prep, "CHUNK_BYTES", 20_000)
    monkeypatch.setattr(prep, "_work", killed)
    with pytest.raises(KeyboardInterrupt):
        shard(corpus, out, 1)
    monkeypatch.undo()
    assert len(calls) == 3 and not list(out.glob("*.00001.*")) and not list(out.glob(".*"))
    # what a SIGKILL can leave: a stream still being written, and one renamed before shard.00001.json was written
    (out / ".train_js.00001.bin.tmp").write_bytes(b"\1\2\3")
    (out / "train_js.00001.bin").write_bytes(b"\1\2\3\4")
    with pytest.raises(DataError, match="shard 1 is missing"):
        TokenLoader(out, 2, 16)
    shard(corpus, out, 1)  # the re-run completes the set
    assert_same_result(out, corpus)


def run_cli(*args):
    """data/prepare.py's exit status."""
    try:
        prep.main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def one_line_error(capsys, message):
    """The error is one line, the last on stderr (after the progress bar of a shard that ran)."""
    lines = capsys.readouterr().err.rstrip("\n").split("\n")
    assert lines[-1].startswith("error: ") and not any("error" in line for line in lines[:-1]), lines
    assert message in lines[-1], lines[-1]


def test_bad_shard_input_one_line_errors(corpus, tmp_path, capsys):
    root, tok, _ = corpus
    src, out = root / "src", tmp_path / "out"
    for spec in ("3/3", "-1/3", "1", "a/b"):
        assert run_cli(src, "--out", out, "--tokenizer", tok, f"--shard={spec}") == 1
        one_line_error(capsys, f"--shard={spec} is not I/N with 0 <= I < N")
    assert run_cli(src, "--out", out, "--train-tokenizer", 400, "--shard=0/2") == 1
    one_line_error(capsys, "--shard needs --tokenizer: a BPE trained in each shard would differ between shards")
    assert run_cli("--merge", "--out", out) == 1
    one_line_error(capsys, "holds no shards (shard.*.json)")
    # a missing shard at join time
    assert run_cli(src, "--out", out, "--tokenizer", tok, "--shard=0/2") == 0
    assert run_cli("--merge", "--out", out) == 1
    one_line_error(capsys, "holds 1 of 2 shards, shard 1 is missing: run data/prepare.py with --shard=1/2")
    # shards prepared with different tokenizers
    other = tmp_path / "other_tok"
    shutil.copytree(tok, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    assert run_cli(src, "--out", out, "--tokenizer", other, "--shard=1/2") == 1
    one_line_error(capsys, f"shard 1 was prepared with the tokenizer {other.resolve()} and shard 0 with "
                           f"{Path(tok).resolve()}, whose files differ: prepare every shard with the same --tokenizer")
    assert not (out / "meta.json").exists()


def test_missing_shard_file_at_load_time(corpus, tmp_path):
    out = tmp_path / "n2"
    shard(corpus, out, 0, n=2)
    shard(corpus, out, 1, n=2)
    TokenLoader(out, 2, 16)
    (out / "train_js.00001.bin").unlink()
    with pytest.raises(DataError, match=r"train_js.00001.bin is missing: re-run data/prepare.py with --shard=1/2 "
                                        "and the same arguments"):
        TokenLoader(out, 2, 16)


@pytest.mark.slow  # torchrun, 2 ranks
def test_two_ranks_train_on_shards_and_resume_exactly(corpus, tmp_path):
    out = tmp_path / "n3"
    for i in range(3):
        shard(corpus, out, i)
    run = [*QUICK, f"--data_dir={out}", "--batch_size=2", "--max_iters=6", "--eval_interval=3", "--ckpt_interval=3",
           "--fim_rate=0.5"]
    ref = tmp_path / "ref"
    run_train([*run, f"--out_dir={ref}"], nproc=2)
    resumed = tmp_path / "resumed"
    r = run_train([*run, f"--out_dir={resumed}", f"--resume={ref / 'ckpt' / 'step-000003'}"], nproc=2)
    assert "resumed from" in r.stdout
    a, b = train_losses(ref), train_losses(resumed)
    assert a[6] < a[1]  # it trains
    assert [b[s] for s in (4, 5, 6)] == [a[s] for s in (4, 5, 6)]
