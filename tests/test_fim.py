"""Fill-in-the-middle: the rearrangement (data/fim.py), the loader with it, train.py's val_loss_fim, and the
infilling evaluation (evals/fim.py)."""
import json
import os

import numpy as np
import pytest
import torch

from data.fim import permute
from data.loader import TokenLoader, read_meta, val_batches

IDS = {"prefix": 1, "middle": 2, "suffix": 3}
EOS = 0


def docs_of(seq):
    return np.split(seq, np.flatnonzero(seq == EOS) + 1)


def restore(doc):
    """A rearranged document (without its EOS) back in order: PSM or SPM -> prefix middle suffix."""
    doc = list(doc)
    if doc[:2] == [1, 3]:  # SPM: <pre> <suf> suffix <mid> prefix middle
        m = doc.index(2)
        return None, doc[2:m], doc[m + 1:]  # the suffix, and prefix+middle (their cut is not recoverable)
    s, m = doc.index(3), doc.index(2)
    return doc[1:s], doc[m + 1:], doc[s + 1:m]


def test_psm_and_spm_keep_every_token_and_the_length():
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, 500, size=n) for n in (40, 1, 75, 12, 30)]
    seq = np.concatenate([np.r_[d, EOS] for d in docs])
    seen = set()
    for k in range(40):
        out = permute(seq, IDS, EOS, np.random.default_rng([7, k]), rate=1.0, spm_rate=0.5)
        assert len(out) == len(seq) and out.dtype == seq.dtype
        parts = docs_of(np.r_[out, [EOS] * 15])[:len(docs)]  # the end was cut by 3 tokens per document
        for original, part in zip(docs, parts):
            part = part[part != EOS]
            if len(part) < len(original) + 3:
                break  # cut at the sequence's end
            pre, mid, suf = restore(part)
            if pre is None:
                seen.add("spm")
                assert list(original[len(original) - len(mid):]) == mid  # the suffix is the document's end
                assert list(original[:len(suf)]) == suf                   # then prefix + middle, its start
            else:
                seen.add("psm")
                assert pre + mid + suf == list(original)
    assert seen == {"psm", "spm"}
    assert np.array_equal(permute(seq, IDS, EOS, np.random.default_rng(1), 0.0, 0.5), seq)


def test_rate_is_the_fraction_of_documents_rearranged():
    seq = np.tile(np.r_[np.arange(10, 30), EOS], 400)
    out = permute(seq, IDS, EOS, np.random.default_rng(3), rate=0.5, spm_rate=0.0)
    rearranged = (out == IDS["prefix"]).sum() / 400
    assert 0.4 < rearranged < 0.6  # 400 documents, most of them whole


def test_loader_with_fim_is_deterministic_rank_disjoint_and_resumes(tiny_data):
    meta = read_meta(tiny_data)
    sentinels = set(meta["fim"].values())
    one = TokenLoader(tiny_data, 4, 64, fim_rate=0.5, seed=3)
    a = [one.next_batch()[0] for _ in range(4)]
    ranks = [TokenLoader(tiny_data, 2, 64, rank=r, world_size=2, fim_rate=0.5, seed=3) for r in range(2)]
    b = [torch.cat([r.next_batch()[0] for r in ranks]) for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # 2 ranks x 2 see what 1 rank x 4 sees
    assert sentinels & set(torch.cat(a).flatten().tolist())
    state = one.state_dict()
    later = [one.next_batch()[0] for _ in range(2)]
    resumed = TokenLoader(tiny_data, 4, 64, fim_rate=0.5, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(x, resumed.next_batch()[0]) for x in later)
    plain = TokenLoader(tiny_data, 4, 64, seed=3)
    assert not sentinels & set(torch.cat([plain.next_batch()[0] for _ in range(4)]).flatten().tolist())
    val = val_batches(tiny_data, "js", 2, 64, 2, fim_spm_rate=0.5)
    assert all((x == meta["fim"]["prefix"]).any(dim=1).all() for x, _ in val)  # every val row has a rearranged doc


@pytest.mark.slow
def test_train_logs_val_loss_fim_and_epochs_with_a_token_budget(tmp_path, tiny_data):
    from helpers import QUICK, read_jsonl, run_train
    out = tmp_path / "run"
    r = run_train([*QUICK, f"--out_dir={out}", f"--data_dir={tiny_data}", "--fim_rate=0.5", "--max_iters=0",
                   "--train_tokens=2000", "--eval_interval=4"])
    records = read_jsonl(out / "metrics.jsonl")
    steps = [x for x in records if x["kind"] == "train"]
    evals = [x for x in records if x["kind"] == "eval"]
    assert steps[-1]["step"] == 8  # ceil(2000 / (4 x 64)) steps
    assert [e["step"] for e in evals] == [0, 4, 8]
    assert all(e["val_loss_fim"] > 0 and e["val_loss_fim/xml"] > 0 and e["val_loss/xml"] > 0 for e in evals)
    meta = read_meta(tiny_data)
    epochs = {lang: steps[-1][f"epochs/{lang}"] for lang in meta["langs"]}
    chunks = {lang: (meta["files"][f"train_{lang}"]["tokens"] - 64) // 64 for lang in meta["langs"]}
    assert sum(epochs[lang] * chunks[lang] for lang in epochs) == pytest.approx(8 * 4)  # sequences consumed
    line = [x for x in r.stdout.splitlines() if x.startswith("step 8 ")][0]
    assert "2.05k tok seen" in line and "| epochs js " in line, line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == 2048 and summary["epochs"] == pytest.approx(epochs)
    assert "| epochs of each train stream | js " in (out / "summary.md").read_text()


# -- infilling evaluation (evals/fim.py) ---------------------------------------------------------------------------

DOC = ('<?xml version="1.0"?>\n<catalog>\n  <book id="bk1">\n    <author>Ada</author>\n    <title>Notes</title>\n'
       '  </book>\n\n  <book id="bk2"/>\n</catalog>\n')


def test_spans_cut_after_a_word_and_reassemble():
    from evals import fim
    lines = [fim.cut(DOC, *span) for span in fim.line_spans(DOC)]
    blocks = [fim.cut(DOC, *span) for span in fim.block_spans(DOC, "xml")]
    assert [m for _, m, _ in lines] == ["\n<catalog>", '\n  <book id="bk1">', "\n    <author>Ada</author>",
                                        "\n    <title>Notes</title>", "\n  </book>", '\n\n  <book id="bk2"/>',
                                        "\n</catalog>"]
    assert [m for _, m, _ in blocks] == ['\n  <book id="bk1">\n    <author>Ada</author>\n    <title>Notes</title>\n'
                                         '  </book>\n\n  <book id="bk2"/>',
                                         "\n    <author>Ada</author>\n    <title>Notes</title>"]
    for pre, mid, suf in lines + blocks:
        assert pre + mid + suf == DOC and not pre[-1].isspace() and suf[:1] in ("\n", "")
    assert fim.first_line("\n  <a/>\n  <b/>") == "\n  <a/>" and fim.lines_like("\n x\n y\n z", "\n a\n b") == "\n x\n y"


@pytest.mark.slow
def test_validate_fim_and_ppl_on_a_fim_run(tmp_path, tiny_data):
    """A short FIM run: validate's ppl gives the val_loss_fim train.py logged, and its fim task cuts real val
    documents whose untouched versions all parse, in both orders and left to right."""
    import subprocess
    import sys
    from helpers import QUICK, ROOT, read_jsonl, run_train
    out = tmp_path / "run"
    run_train([*QUICK, f"--out_dir={out}", f"--data_dir={tiny_data}", "--fim_rate=0.5", "--max_iters=6",
               "--eval_interval=6", "--block_size=128"])
    r = subprocess.run([sys.executable, "validate.py", "--ckpt", str(out), "--tasks", "ppl", "fim", "--n-prompts", "4",
                        "--max-new-tokens", "16", "--out", str(tmp_path / "val")], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    tasks = json.loads((tmp_path / "val" / "report.json").read_text())["runs"][0]["tasks"]
    final = [x for x in read_jsonl(out / "metrics.jsonl") if x["kind"] == "eval"][-1]
    for k in ("val_loss_fim", "val_loss_fim/xml", "val_loss/js"):
        assert tasks["ppl"][k] == pytest.approx(final[k], rel=1e-6), k
    got = tasks["fim"]
    rows = [json.loads(x) for x in (tmp_path / "val" / "samples.jsonl").read_text().splitlines()]
    assert got["n"] == len(rows) > 12 and {(x["lang"], x["kind"]) for x in rows} >= {("xml", "line"), ("js", "block")}
    assert got["reference_valid_rate"] == 1.0  # synthetic documents parse: the cut and reassembly lose nothing
    docs = {x["prefix"] + x["middle"] + x["suffix"] for x in rows}  # each document cut several ways
    assert len(docs) < len(rows) and all(x["middle"][:1].isspace() and "\n" in x["middle"] for x in rows)
    exact = sum(x["spm_exact"] for x in rows) / len(rows)
    assert got["spm_exact_match"] == exact and got["l2r_exact_match"] == sum(x["l2r_exact"] for x in rows) / len(rows)


@pytest.mark.slow
@pytest.mark.twins  # two full tiny trainings: not in CI's command (README)
def test_fim_twin_infills_better_at_no_cost_to_left_to_right(tmp_path):
    """config/tiny.py trained twice from the same seed, fim_rate 0.5 and 0: the FIM model infills better (the
    better of its two orders against the twin's), and its left-to-right val loss stays within 5% of the twin's."""
    import subprocess
    import sys
    from helpers import ROOT, run_train
    got = {}
    for rate in (0.5, 0.0):
        out = tmp_path / f"fim{rate}"
        run_train(["config/tiny.py", f"--out_dir={out}", f"--data_dir={tmp_path / 'data'}", f"--fim_rate={rate}",
                   "--max_iters=2000", "--tensorboard=False"], timeout=3000, env={"OMP_NUM_THREADS": "2"})
        r = subprocess.run([sys.executable, "validate.py", "--ckpt", str(out), "--tasks", "ppl", "fim", "--out",
                            str(tmp_path / f"val{rate}")], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                           env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert r.returncode == 0, r.stderr[-3000:]
        got[rate] = json.loads((tmp_path / f"val{rate}" / "report.json").read_text())["runs"][0]["tasks"]
    fim, twin = got[0.5], got[0.0]
    best = {rate: max(t["fim"]["exact_match"], t["fim"]["spm_exact_match"]) for rate, t in got.items()}
    print(json.dumps({rate: {k: t["fim"][k] for k in ("n", "exact_match", "spm_exact_match", "l2r_exact_match",
                                                        "xml/line/spm_exact_match")} | {
        k: t["ppl"][k] for k in ("val_loss", "val_loss_fim")} for rate, t in got.items()}, indent=1))
    assert best[0.5] >= best[0.0] + 0.03  # measured: 0.171 against 0.122 (SPM), n 263
    assert fim["fim"]["xml/line/spm_exact_match"] >= twin["fim"]["xml/line/spm_exact_match"] + 0.1  # 0.35 / 0.15
    assert fim["ppl"]["val_loss_fim"] <= 0.85 * twin["ppl"]["val_loss_fim"]  # 2.34 against 3.19: it learned FIM
    assert fim["ppl"]["val_loss"] <= 1.05 * twin["ppl"]["val_loss"]  # FIM for free: 2.182 against 2.184
