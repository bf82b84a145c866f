"""The recipe ablation (ablate.py) in its smoke version: arms a and b of config/ablate_arms.py, one seed, a few steps,
on the corpus the install puts on disk. Retention is measured on the base's own languages, and forgetting shows."""
import json
import os
import statistics
import subprocess
import sys

import optuna
import pytest

import sweep
import train
from helpers import ROOT, assert_picture


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablate")
    space = tmp / "space.py"  # the shipped arms a and b, one seed, the shipped objectives
    space.write_text(f"exec(open({os.path.join(ROOT, 'config', 'ablate_arms.py')!r}).read())\n"
                     f"arm = variants(a=arm.values['a'], b=arm.values['b'])\nseed = choice([1])\n")
    r = subprocess.run([sys.executable, "ablate.py", "--smoke", f"--space={space}", f"--out={tmp / 'out'}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp / "out", space, r.stdout


@pytest.mark.slow
def test_retention_is_measured_on_the_base_languages(smoke):
    out, space, log = smoke
    _, objectives = sweep.load_space(str(space), ["config/ablate.py"])
    langs = lambda metrics: {m.split("/", 1)[1] for m in metrics}
    assert langs(objectives["retention"].metrics) == set(train.load_config(["config/ablate_base.py"]).mixture)
    assert langs(objectives["gain"].metrics) == set(train.load_config(["config/ablate.py"]).mixture)
    study = optuna.load_study(study_name="arms", storage=f"sqlite:///{out}/arms/study.db")
    assert sorted(t.params["arm"] for t in study.trials) == ["a", "b"]
    for t in study.trials:  # each trial's values are those means of its run's final eval
        final = json.loads(open(os.path.join(t.user_attrs["out_dir"], "summary.json")).read())["final_eval"]
        assert t.values == [pytest.approx(statistics.mean(final[m] for m in o.metrics)) for o in objectives.values()]
    # the table's base is the base: step 0 of an arm (identity blocks added or not) equals the base run's last eval
    result = json.loads((out / "ablation.json").read_text())
    base_final = json.loads((out / "base" / "summary.json").read_text())["final_eval"]
    for lang in ("py", "txt", "xml", "js"):
        assert result["base"][f"val_loss/{lang}"] == pytest.approx(base_final[f"val_loss/{lang}"], abs=1e-6)
    table = (out / "ablation.md").read_text()
    assert "| random twin of the base |" in table and "| a |" in table and "| b |" in table
    assert_picture(out / "ablation.png")
    assert_picture(out / "arms" / "pareto.png")
    assert "5/5 the report" in log


@pytest.mark.slow
def test_forgetting_is_visible_and_llama_pro_trains_one_block(smoke):
    out, _, _ = smoke
    result = json.loads((out / "ablation.json").read_text())
    a, b, base = result["arms"]["a"], result["arms"]["b"], result["base"]
    assert a["val_loss/py"][0] > base["val_loss/py"] + 0.1  # all weights on new languages: Python is forgotten
    assert a["gain"][0] < base["gain"] - 0.3  # and the new languages are learned
    assert b["val_loss/py"][0] < a["val_loss/py"][0]  # LLaMA-Pro keeps more of it
    cfg = json.loads((out / "base" / "best" / "config.json").read_text())
    h, m = cfg["hidden_size"], cfg["intermediate_size"]
    one_block = 4 * (h * h + h) + (h * m + m) + (m * h + h) + 2 * h  # q k v dense, fc1, fc2, layer norm
    assert b["trainable_params"][0] == one_block < a["trainable_params"][0]
    assert b["tok_per_s"][0] > 0 and b["peak_rss_gib"][0] > 0


def test_a_space_without_arms_or_objectives_is_refused_before_any_work(tmp_path, capsys):
    import ablate
    (tmp_path / "space.py").write_text("arm = variants(a={})\nseed = choice([1])\n")
    assert ablate.main([f"--space={tmp_path / 'space.py'}", f"--out={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: space file") and "two objectives, gain and retention" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
