"""sweep.py as users run it: a small search on config/tiny.py with a trial pruned through SIGTERM, best.py that
reproduces the best trial, two workers sharing one storage, a killed worker's trial retried, and one-line errors."""
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

import ckpt
import sweep
from helpers import ROOT, assert_picture, read_jsonl, run_train

# short runs: 30 steps, an eval every 10, so the pruner sees 4 values a trial
SHORT = ["config/tiny.py", "--dtype='float32'", "--max_iters=30", "--eval_interval=10", "--ckpt_interval=10",
         "--eval_iters=1", "--tensorboard=False", "--batch_size=4", "--block_size=64", "--warmup_iters=2",
         "--log_interval=10"]
# one learning rate that learns and one that cannot: a trial of the second is worse than the median at step 10
SPACE = "learning_rate = choice([3e-3, 1e-7])\nwarmup_iters = intrange(0, 4, step=2)\n"


def run_sweep(*args, timeout=600):
    return subprocess.run([sys.executable, "sweep.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def start_sweep(*args, log):
    return subprocess.Popen([sys.executable, "sweep.py", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def load(storage, name):
    return optuna.load_study(study_name=name, storage=storage)


@pytest.fixture(scope="module")
def four(tiny_data, tmp_path_factory):
    """The laptop command: 4 trials, one worker, SQLite in the sweep dir, a seeded sampler."""
    tmp = tmp_path_factory.mktemp("sweep")
    (tmp / "space.py").write_text(SPACE)
    d = tmp / "sweep"
    r = run_sweep(*SHORT, f"--data_dir={tiny_data}", f"--space={tmp / 'space.py'}", "--n_trials=4",
                  f"--sweep_dir={d}", "--seed=0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return d, r.stdout, load(f"sqlite:///{d}/study.db", "space")


@pytest.mark.slow
def test_four_trials_one_pruned_through_sigterm(four):
    d, out, study = four
    trials = study.get_trials()
    assert len(trials) == 4 and {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, [(t.params, t.intermediate_values) for t in trials]
    for t in pruned:  # stopped by SIGTERM before max_iters, with a checkpoint that verifies
        summary = json.load(open(os.path.join(t.user_attrs["out_dir"], "summary.json")))
        assert summary["stop_reason"] == "signal SIGTERM" and summary["steps"] < 30
        path = ckpt.find_resume(t.user_attrs["out_dir"], "auto")
        assert path is not None and ckpt.verify(path) == []
        assert t.params["learning_rate"] == "1e-07"
    for t in trials:
        if t.state == TrialState.COMPLETE:  # the value is the best val_loss of the run, from its summary
            summary = json.load(open(os.path.join(t.user_attrs["out_dir"], "summary.json")))
            evals = [r["val_loss"] for r in read_jsonl(os.path.join(t.user_attrs["out_dir"], "metrics.jsonl"))
                     if r["kind"] == "eval"]
            assert t.value == summary["best_metric"] == min(evals) and summary["steps"] == 30
    assert study.best_trial.params["learning_rate"] == "0.003"
    table = (d / "trials.md").read_text().splitlines()
    assert len([line for line in table if line.startswith("| ") and line[2].isdigit()]) == 4
    assert "| pruned |" in "\n".join(table)
    for png in ("history.png", "importances.png"):
        assert_picture(d / png)
        assert f"![{png}]({png})" in table  # trials.md shows them
    assert out.count(" done") == 4 and "4/4 done" in out and " pruned at step " in out


@pytest.mark.slow
def test_best_py_reproduces_the_best_trial(four):
    d, _, study = four
    text = (d / "best.py").read_text()
    assert "learning_rate = 0.003  # searched" in text and f"out_dir = {str(d / 'best')!r}" in text
    run_train(["config/tiny.py", str(d / "best.py")])  # the command best.py's header gives
    summary = json.load(open(d / "best" / "summary.json"))
    assert summary["best_metric"] == study.best_value


@pytest.mark.slow
def test_two_workers_share_one_budget(tiny_data, tmp_path):
    (tmp_path / "space.py").write_text(SPACE)
    args = [*SHORT, f"--data_dir={tiny_data}", f"--space={tmp_path / 'space.py'}", "--n_trials=4",
            f"--storage=sqlite:///{tmp_path}/shared.db", "--study=shared", f"--sweep_dir={tmp_path / 'sweep'}"]
    with open(tmp_path / "a.log", "w") as a, open(tmp_path / "b.log", "w") as b:
        workers = [start_sweep(*args, log=a), start_sweep(*args, log=b)]
        assert [w.wait(timeout=600) for w in workers] == [0, 0], (tmp_path / "a.log").read_text()[-2000:]
    trials = load(f"sqlite:///{tmp_path}/shared.db", "shared").get_trials()
    ran = [t for t in trials if not t.user_attrs.get("surplus")]
    assert len(ran) == 4 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in ran)
    assert len({t.user_attrs["worker"] for t in ran}) == 2  # both worked
    assert len({t.user_attrs["out_dir"] for t in ran}) == 4
    for t in ran:  # each trial ran once: one run's steps, never a second start
        steps = [r["step"] for r in read_jsonl(os.path.join(t.user_attrs["out_dir"], "metrics.jsonl"))
                 if r["kind"] == "train"]
        assert steps == sorted(set(steps)) and steps[0] == 1


@pytest.mark.slow
def test_killed_worker_trial_is_retried_and_resumes(tiny_data, tmp_path):
    (tmp_path / "space.py").write_text(SPACE)
    storage = f"sqlite:///{tmp_path}/s.db"
    args = [*SHORT, "--max_iters=60", f"--data_dir={tiny_data}", f"--space={tmp_path / 'space.py'}", "--n_trials=2",
            f"--storage={storage}", "--study=k", f"--sweep_dir={tmp_path / 'sweep'}", "--heartbeat=1", "--seed=1"]
    first = tmp_path / "sweep" / "trial-0000"
    with open(tmp_path / "a.log", "w") as log:
        worker = start_sweep(*args, log=log)
        deadline = time.time() + 180
        while time.time() < deadline and ckpt.find_resume(str(first), "auto") is None:
            time.sleep(0.5)
        assert ckpt.find_resume(str(first), "auto") is not None, (tmp_path / "a.log").read_text()[-2000:]
        worker.send_signal(signal.SIGKILL)  # the node is gone; its train.py gets SIGTERM and checkpoints
        worker.wait()
    r = run_sweep(*args)  # a worker on a fresh start finds the dead worker's trial and runs it again
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = load(storage, "k").get_trials()
    assert trials[0].state == TrialState.FAIL  # failed after its heartbeat stopped
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retry[0].params == trials[0].params and retry[0].user_attrs["out_dir"] == str(first)
    assert "resumed from" in (first / "train.log").read_text()  # from the killed run's own checkpoint
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 2


@pytest.mark.slow
def test_journal_storage_and_a_torchrun_trial(tiny_data, tmp_path):
    """A journal file as the storage, and a trial on 2 ranks under torchrun."""
    (tmp_path / "space.py").write_text(SPACE)
    journal = tmp_path / "study.log"
    r = run_sweep(*SHORT, f"--data_dir={tiny_data}", f"--space={tmp_path / 'space.py'}", "--n_trials=1",
                  f"--storage=journal:{journal}", "--study=j", f"--sweep_dir={tmp_path / 'sweep'}",
                  "--nproc_per_node=2", "--batch_size=2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    (trial,) = optuna.load_study(study_name="j", storage=storage).get_trials()
    assert trial.state == TrialState.COMPLETE
    state = ckpt.train_state(ckpt.find_resume(trial.user_attrs["out_dir"], "auto"))
    assert state["world_size"] == 2 and state["step"] == 30


@pytest.mark.parametrize("space, message", [
    ("learning_rat = loguniform(1e-4, 1e-2)\n",
     "unknown config key 'learning_rat' in flag --learning_rat=0.0001; did you mean 'learning_rate'?"),
    ("warmup_iters = loguniform(1e-4, 1e-2)\n", "config key 'warmup_iters' in flag --warmup_iters=0.0001 must be int"),
    ("learning_rate = uniform(1e-2, 1e-4)\n", "learning_rate has an empty range [0.01, 0.0001]"),
    ("mixture = choice([])\n", "mixture = choice([]) has nothing to choose from"),
    ("learning_rate = 0.1\n", "learning_rate = 0.1 is not a distribution"),
    ("fsdp = choice(['full_shard', 'zero3'])\n", "config key 'fsdp' must be one of"),
    ("arm = variants(a={}, b={'expand_layer': 1})\n",
     "variant arm=b: unknown config key 'expand_layer' in flag --expand_layer=1; did you mean 'expand_layers'?"),
    ("arm = variants(a=[1])\n", "variant arm=a must be a dict of config values, got [1]"),
    ("seed = choice([1, 2])\ngain = objective('lower', 'val_loss/py')\n",
     "objective gain needs a direction, 'min' or 'max', then eval metrics"),
])
def test_bad_space_is_a_one_line_error_before_any_trial(tmp_path, capsys, space, message):
    (tmp_path / "space.py").write_text(space)
    rc = sweep.main(["config/tiny.py", f"--space={tmp_path / 'space.py'}", "--n_trials=2",
                     f"--sweep_dir={tmp_path / 'sweep'}"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: space file") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "sweep").exists()  # nothing was started


@pytest.mark.parametrize("storage", ["sqlite:////nonexistent-dir/study.db", "mysql+pymysql://127.0.0.1:1/db"])
def test_unreachable_storage_is_a_one_line_error(tmp_path, capsys, storage):
    (tmp_path / "space.py").write_text(SPACE)
    rc = sweep.main(["config/tiny.py", f"--space={tmp_path / 'space.py'}", "--n_trials=2", f"--storage={storage}",
                     f"--sweep_dir={tmp_path / 'sweep'}"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith(f"error: cannot open storage {storage}: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("space, flags, message", [
    ("learning_rate = loguniform(1e-4, 1e-2)\n", ["--grid"],
     "--grid needs choice() or variants() for every key; learning_rate is a range: list its values with choice([...])"),
    ("learning_rate = loguniform(1e-4, 1e-2)\n", [], "--n_trials is required without --grid: how many trials the "
                                                     "study runs"),
])
def test_grid_and_budget_errors(tmp_path, capsys, space, flags, message):
    (tmp_path / "space.py").write_text(space)
    rc = sweep.main(["config/tiny.py", f"--space={tmp_path / 'space.py'}", f"--sweep_dir={tmp_path / 'sweep'}",
                     *flags])
    err = capsys.readouterr().err
    assert rc == 1 and err == f"error: {message}\n", err
    assert not (tmp_path / "sweep").exists()


def test_variants_and_objectives_in_a_space_file(tmp_path):
    """A variant gives its config values, its name is what Optuna sees; the grid lists every combination;
    _names are the file's own helpers; objectives are kept apart from the space."""
    (tmp_path / "space.py").write_text(
        "_lr = 1e-3\narm = variants(plain={}, wide=dict(expand_layers=1, learning_rate=_lr))\n"
        "seed = choice([1, 2])\ngain = objective('min', 'val_loss/xml', 'val_loss/js')\n")
    space, objectives = sweep.load_space(str(tmp_path / "space.py"), ["config/tiny.py"])
    assert set(space) == {"arm", "seed"} and list(objectives) == ["gain"]
    assert objectives["gain"].direction == "min" and objectives["gain"].metrics == ("val_loss/xml", "val_loss/js")
    assert sweep.grid_of(space) == [{"arm": "plain", "seed": "1"}, {"arm": "plain", "seed": "2"},
                                    {"arm": "wide", "seed": "1"}, {"arm": "wide", "seed": "2"}]
    trial = optuna.trial.FixedTrial({"arm": "wide", "seed": "2"})
    assert sweep.suggest(trial, space) == {"expand_layers": 1, "learning_rate": 1e-3, "seed": 2}
