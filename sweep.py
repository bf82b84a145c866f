"""Hyperparameter search over train.py with Optuna: every trial is an ordinary train.py run, pruned by our own evals.

  python sweep.py config/tiny.py --space=config/sweep_tiny.py --n_trials=20            # one laptop
  python sweep.py config/phi2_xml.py --space=my_space.py --n_trials=40 --nproc_per_node=8 \\
      --storage=postgresql://user@db-host/sweeps --study=phi2-lr                        # the same on every node

The space file names config keys and distributions (loguniform, uniform, intrange, choice), and may name variants: a
choice among named sets of config values, such as the arms of an ablation. --key=value flags and config files are
train.py's and stay fixed. --grid runs every combination of the space's choices and variants once, in order, instead
of searching: they are queued in the study when it is created, and workers take them. Each trial runs train.py
(torchrun with --nproc_per_node > 1) in {sweep_dir}/trial-NNNN. Each eval's early_stop_metric goes to the pruner; a
pruned run gets SIGTERM, checkpoints and exits. A trial's value is the best metric in its summary.json, minimised or
maximised as early_stop_mode says. A space file that names objectives (objective("min", "val_loss/py",
"val_loss/txt"): the mean of eval metrics at the end of the run) makes the study multi-objective: a trial's values
are its final eval's, nothing is pruned (Optuna cannot prune on several objectives), and the trials on the Pareto
front are marked and plotted.

Storage: SQLite in the sweep dir by default; any RDB URL (PostgreSQL for many machines); or journal:PATH, a journal
file for workers on one shared filesystem. Workers with the same --storage and --study share the budget of
--n_trials. On an RDB storage a worker sends heartbeats, and a trial whose worker died (preemption, kill -9) is
failed after 2 heartbeats and queued again, resuming from its own checkpoints (Optuna's journal storage has no
heartbeat: restart such a sweep by hand). A crashed run is a failed trial with its log's last lines.
Results, rewritten as trials finish: trials.md, best.py (python train.py <configs> {sweep_dir}/best.py reproduces the
best trial), history.png and importances.png; with objectives, pareto.png instead of best.py and the two plots.
"""
import argparse
import ctypes
import dataclasses
import datetime
import fcntl
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import optuna
import psutil
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

import train
from monitor import save_png

ROOT = os.path.dirname(os.path.abspath(__file__))
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat, retry, mpl plots
optuna.logging.set_verbosity(optuna.logging.WARNING)  # sweep.py prints a line per trial itself


class SweepError(ValueError):
    """Bad input to sweep.py; the message is one line with the fix."""


class TrialCrashed(RuntimeError):
    """train.py exited with an error: the trial fails and the sweep goes on."""


class Surplus(RuntimeError):
    """Workers that asked for a trial at the same moment overshot the budget: the later trial does not run."""


# -- the search space: a Python file assigning distributions to config keys ----------------------------------------

@dataclasses.dataclass
class Range:
    low: float
    high: float
    log: bool = False
    step: int | None = None  # integers, in steps of this


def loguniform(low, high):
    return Range(low, high, log=True)


def uniform(low, high):
    return Range(low, high)


def intrange(low, high, step=1):
    return Range(low, high, step=step)


@dataclasses.dataclass
class choice:
    """Any config values (dicts too): Optuna sees their reprs, trials get the values back."""
    values: list


class variants:
    """A choice among named sets of config values: arm = variants(a={}, b={"expand_layers": 1}). The name is not
    a config key; Optuna sees the variant's name, and a trial gets its config values."""
    def __init__(self, **named):
        self.values = named


class objective:
    """One objective of a multi-objective study: the mean of these eval metrics at the end of a trial's run,
    minimised or maximised: gain = objective("min", "val_loss/js", "val_loss/xml")."""
    def __init__(self, direction, *metrics):
        self.direction, self.metrics = direction, metrics


HELPERS = {"loguniform": loguniform, "uniform": uniform, "intrange": intrange, "choice": choice, "variants": variants,
           "objective": objective}


def load_space(path, train_args):
    """({key: distribution}, {name: objective}) from the space file, each key and every value it can take checked
    by train.py's own config loader, so a bad space fails here in one line, before any trial starts."""
    if not os.path.isfile(path):
        raise SweepError(f"space file '{path}' not found; pass --space=FILE (see config/sweep_tiny.py)")
    scope = dict(HELPERS, __file__=path)
    try:
        exec(compile(open(path).read(), path, "exec"), scope)  # the user's own file, as configs are
    except Exception as e:
        raise SweepError(f"space file '{path}': {type(e).__name__}: {e}") from None
    named = {k: v for k, v in scope.items() if not k.startswith("_") and k not in HELPERS}  # _names: the file's own
    objectives = {k: v for k, v in named.items() if isinstance(v, objective)}
    space = {k: v for k, v in named.items() if k not in objectives}
    if not space:
        raise SweepError(f"space file '{path}' names no config key; e.g. learning_rate = loguniform(1e-4, 1e-2)")
    for name, obj in objectives.items():
        if obj.direction not in ("min", "max") or not obj.metrics:
            raise SweepError(f"space file '{path}': objective {name} needs a direction, 'min' or 'max', then eval "
                             f"metrics, e.g. objective('min', 'val_loss/py'); got {obj.direction!r}, {obj.metrics}")
    for key, dist in space.items():
        if isinstance(dist, variants):
            for label, values in dist.values.items():
                if not isinstance(values, dict):
                    raise SweepError(f"space file '{path}': variant {key}={label} must be a dict of config values, "
                                     f"got {values!r}")
                try:
                    train.load_config(train_args + [f"--{k}={v!r}" for k, v in values.items()])
                except ValueError as e:
                    raise SweepError(f"space file '{path}': variant {key}={label}: {e}") from None
            if not dist.values:
                raise SweepError(f"space file '{path}': {key} = variants() has nothing to choose from")
            continue
        if isinstance(dist, choice):
            values = list(dist.values)
        elif isinstance(dist, Range):
            values = [dist.low, dist.high]
            if not dist.low < dist.high:
                raise SweepError(f"space file '{path}': {key} has an empty range [{dist.low}, {dist.high}]; "
                                 f"low must be below high")
        else:
            raise SweepError(f"space file '{path}': {key} = {dist!r} is not a distribution; use loguniform, uniform, "
                             f"intrange, choice or variants, or pass a fixed value as --{key}=VALUE")
        if not values:
            raise SweepError(f"space file '{path}': {key} = choice([]) has nothing to choose from")
        for value in values:
            try:
                train.load_config(train_args + [f"--{key}={value!r}"])
            except ValueError as e:
                raise SweepError(f"space file '{path}': {e}") from None
    return space, objectives


def grid_of(space):
    """[params] of every combination of the space's choices and variants, in order: what Optuna sees of each
    (a choice's repr, a variant's name)."""
    ranges = [k for k, d in space.items() if isinstance(d, Range)]
    if ranges:
        raise SweepError(f"--grid needs choice() or variants() for every key; {', '.join(ranges)} is a range: "
                         f"list its values with choice([...])")
    axes = {k: list(d.values) if isinstance(d, variants) else [repr(v) for v in d.values] for k, d in space.items()}
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def suggest(trial, space):
    """{key: value} for a trial; a retried trial gets its original values back. A variant gives its config values."""
    out = {}
    for key, dist in space.items():
        if isinstance(dist, variants):
            out.update(dist.values[trial.suggest_categorical(key, list(dist.values))])
        elif isinstance(dist, choice):
            by_repr = {repr(v): v for v in dist.values}
            out[key] = by_repr[trial.suggest_categorical(key, list(by_repr))]
        elif dist.step is not None:
            out[key] = trial.suggest_int(key, dist.low, dist.high, step=dist.step)
        else:
            out[key] = trial.suggest_float(key, dist.low, dist.high, log=dist.log)
    return out


# -- one trial: a train.py run, followed through its metrics.jsonl ------------------------------------------------

@dataclasses.dataclass
class Sweep:
    train_args: list  # config files and fixed --key=value flags
    space: dict
    sweep_dir: str
    metric: str
    nproc: int
    n_trials: int
    objectives: dict = dataclasses.field(default_factory=dict)  # {name: objective}: a multi-objective study
    started: float = dataclasses.field(default_factory=time.time)


def _die_with_parent():  # a killed worker leaves no run behind: its run gets SIGTERM, checkpoints and exits
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _terminate(proc, nproc):
    """SIGTERM to the train.py processes: under torchrun its workers, which then checkpoint and exit 0."""
    targets = psutil.Process(proc.pid).children() if nproc > 1 else [psutil.Process(proc.pid)]
    for p in targets:
        p.send_signal(signal.SIGTERM)


def follow(proc, trial, out_dir, sweep):
    """Report each eval's metric while train.py runs; SIGTERM it when the pruner says prune. -> pruned step"""
    path, pos, pruned = os.path.join(out_dir, "metrics.jsonl"), 0, None
    while True:
        exited = proc.poll() is not None
        if os.path.exists(path):
            with open(path, "rb") as f:
                f.seek(pos)
                lines = f.read().split(b"\n")[:-1]  # a line still being written waits for the next poll
            pos += sum(len(line) + 1 for line in lines)
            for rec in map(json.loads, lines):
                if sweep.objectives:  # Optuna prunes single-objective studies only
                    continue
                if pruned is None and rec.get("kind") == "eval" and rec.get(sweep.metric) is not None:
                    trial.report(rec[sweep.metric], rec["step"])
                    if trial.should_prune():
                        pruned = rec["step"]
                        _terminate(proc, sweep.nproc)
        if exited:
            return pruned
        time.sleep(0.5)


def run_trial(trial, sweep):
    ahead = [t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number and counts(t)]
    if len(ahead) >= sweep.n_trials:
        trial.set_user_attr("surplus", True)
        raise Surplus(f"trials 0-{trial.number - 1} already fill the budget of {sweep.n_trials}")
    params = suggest(trial, sweep.space)
    out_dir = trial.user_attrs.get("out_dir") or os.path.join(sweep.sweep_dir, f"trial-{trial.number:04d}")
    trial.set_user_attr("out_dir", out_dir)  # a retry of this trial inherits it, and resumes from its checkpoints
    trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
    launcher = [sys.executable] if sweep.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={sweep.nproc}", "--standalone"]
    flags = [f"--{k}={v!r}" for k, v in params.items()] + [f"--out_dir={out_dir!r}", "--resume='auto'"]
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(out_dir, "train.log"), "ab") as log:
        # run where sweep.py runs, so relative config, data and out paths mean what they mean to the user
        proc = subprocess.Popen(launcher + [os.path.join(ROOT, "train.py"), *sweep.train_args, *flags], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        pruned = follow(proc, trial, out_dir, sweep)
    trial.set_user_attr("wall_s", round(time.time() - t0, 1))
    if proc.returncode != 0 and pruned is None:
        with open(os.path.join(out_dir, "train.log"), errors="replace") as f:
            tail = [line.rstrip() for line in f.readlines()[-20:]]
        trial.set_user_attr("log_tail", tail)
        trial.set_user_attr("crashed", True)
        raise TrialCrashed(f"train.py exited {proc.returncode}: {next((l for l in reversed(tail) if l), '')}")
    if pruned is not None:
        trial.set_user_attr("steps", pruned)
        raise optuna.TrialPruned(f"pruned at step {pruned}")
    with open(os.path.join(out_dir, "summary.json")) as f:
        summary = json.load(f)
    trial.set_user_attr("steps", summary["steps"])
    if sweep.objectives:
        final = summary["final_eval"]
        missing = sorted({m for o in sweep.objectives.values() for m in o.metrics} - set(final))
        if missing:
            raise TrialCrashed(f"{out_dir}/summary.json's final eval has no {', '.join(missing)}; it has "
                               f"{', '.join(sorted(final))}")
        return [sum(final[m] for m in o.metrics) / len(o.metrics) for o in sweep.objectives.values()]
    if summary["best_metric"] is None:
        raise TrialCrashed(f"{out_dir}/summary.json has no {sweep.metric}: the run never evaluated")
    return summary["best_metric"]


# -- the study: storage, a shared budget, results ----------------------------------------------------------------

def open_study(url, name, directions, sweep_dir, heartbeat, seed, queue=()):
    """(study, whether its storage has heartbeats): created or joined; SQLite in the sweep dir unless --storage
    says otherwise. Workers starting together race to create the tables and the study (Optuna #1092): on SQLite
    a file lock beside the database lets one create them while the others wait; elsewhere the losers retry.
    queue: params of trials the worker that creates the study enqueues (--grid), in order; each worker then
    takes the next waiting one, so none runs twice however many workers share the study."""
    url = url or f"sqlite:///{os.path.abspath(sweep_dir)}/study.db"
    lock = None
    try:
        if url.startswith("sqlite:///"):
            lock = open(url[len("sqlite:///"):] + ".lock", "w")
            fcntl.flock(lock, fcntl.LOCK_EX)
        for attempt in range(10):
            try:
                if url.startswith("journal:"):
                    storage = JournalStorage(JournalFileBackend(url[len("journal:"):]))
                else:
                    sqlite = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
                    storage = RDBStorage(url, engine_kwargs=sqlite, heartbeat_interval=heartbeat,
                                         grace_period=2 * heartbeat,
                                         heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
                study = optuna.create_study(storage=storage, study_name=name, directions=directions,
                                            sampler=optuna.samplers.TPESampler(seed=seed),
                                            pruner=optuna.pruners.MedianPruner(n_startup_trials=1), load_if_exists=True)
                if not study.trials:  # a new study, created under the lock on SQLite
                    for params in queue:
                        study.enqueue_trial(params)
                break
            except (optuna.exceptions.DuplicatedStudyError, sqlalchemy.exc.IntegrityError):
                if attempt == 9:
                    raise
                time.sleep(0.2 * (attempt + 1))
    except (ImportError, OSError, optuna.exceptions.OptunaError, sqlalchemy.exc.SQLAlchemyError) as e:
        raise SweepError(f"cannot open storage {url}: {str(e).splitlines()[0]}; check the URL, that the server is up "
                         f"and its driver is installed (PostgreSQL: pip install psycopg2-binary)") from None
    finally:
        if lock is not None:
            lock.close()
    if [d.name.lower() for d in study.directions] != directions:
        raise SweepError(f"study '{name}' in {url} was created to {', '.join(d.name.lower() for d in study.directions)}"
                         f", this sweep would {', '.join(directions)}; pass another --study or change early_stop_mode "
                         f"or the space's objectives")
    return study, isinstance(storage, RDBStorage)


def counts(t):
    """Whether trial t takes a place in the budget: finished, crashed, running or queued. A trial failed for a dead
    worker does not (its retry does), nor does a surplus one."""
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING) or \
        bool(t.user_attrs.get("crashed"))


def tally(study):
    """(finished trials, trials running or queued), of those that count."""
    trials = [t for t in study.get_trials(deepcopy=False) if counts(t)]
    in_flight = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    return len(trials) - in_flight, in_flight


def write_results(study, sweep, base_args):
    """trials.md, best.py and the plots (pareto.png for several objectives), each replaced atomically (several
    workers may write them)."""
    def put(name, text):
        tmp = os.path.join(sweep.sweep_dir, f".{name}.{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(sweep.sweep_dir, name))

    import matplotlib
    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    def plot(name, ax):
        save_png(ax.figure, os.path.join(sweep.sweep_dir, name), dpi=100, bbox_inches="tight")
        matplotlib.pyplot.close(ax.figure)
        return f"\n![{name}]({name})\n"

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    names = list(sweep.objectives) or ["value"]
    front = {t.number for t in study.best_trials} if sweep.objectives and done else set()
    rows = [f"| trial | state | {' | '.join(names)} | params | steps | wall s | note |",
            f"|---:|---|{'---:|' * len(names)}---|---:|---:|---|"]
    for t in study.get_trials(deepcopy=False):
        note = "retry of trial %d" % t.system_attrs["failed_trial"] if "failed_trial" in t.system_attrs else ""
        note = (t.user_attrs.get("log_tail") or [""])[-1][:80] if t.user_attrs.get("crashed") else note
        note = "not run: the budget was full" if t.user_attrs.get("surplus") else note
        if t.state == TrialState.FAIL and not (t.user_attrs.get("crashed") or t.user_attrs.get("surplus")):
            note = "its worker died (no heartbeat); queued again"
        note = "Pareto front" if t.number in front else note
        values = " | ".join(f"{v:.4f}" for v in t.values) if t.values else " | ".join("-" * len(names))
        rows.append(f"| {t.number} | {t.state.name.lower()} | {values} | {t.params} | "
                    f"{t.user_attrs.get('steps', '-')} | {t.user_attrs.get('wall_s', '-')} | {note} |")
    what = ", ".join(f"{n}: {o.direction} the mean of {', '.join(o.metrics)}" for n, o in sweep.objectives.items())
    md = f"# Study {study.study_name}: {what or f'{sweep.metric}, {study.direction.name.lower()}'}\n\n"
    md += "\n".join(rows) + "\n"
    put("trials.md", md)
    if not done:
        return
    if sweep.objectives:  # no single best trial: the front, each trial labelled by its number
        if len(names) > 1:
            md += plot("pareto.png", plots.plot_pareto_front(study, target_names=names))
        put("trials.md", md)
        return
    best = study.best_trial
    chosen = train.load_config(sweep.train_args + [f"--{k}={v!r}" for k, v in suggest(best, sweep.space).items()])
    base = train.load_config(base_args)
    keys = [f.name for f in dataclasses.fields(chosen)  # the searched keys, and what the flags changed
            if f.name in sweep.space or getattr(chosen, f.name) != getattr(base, f.name)]
    lines = [f"# Trial {best.number} of study '{study.study_name}': {sweep.metric} {best.value:.6g}. Reproduce with",
             f"# python train.py {' '.join(base_args)} {os.path.join(sweep.sweep_dir, 'best.py')}",
             f"# written by sweep.py on {datetime.date.today()}"]
    lines += [f"{k} = {getattr(chosen, k)!r}" + ("  # searched" if k in sweep.space else "") for k in keys
              if k != "out_dir"]
    put("best.py", "\n".join(lines + [f"out_dir = {os.path.join(sweep.sweep_dir, 'best')!r}"]) + "\n")
    md += plot("history.png", plots.plot_optimization_history(study))
    if len(done) >= 2 and sweep.space:  # importances need two finished trials
        md += plot("importances.png", plots.plot_param_importances(study))
    put("trials.md", md)  # again, with the plots


def prepare_data_once(cfg, sweep_dir):
    """The synthetic corpus is prepared before any trial, under the sweep's lock: trials must not race to write it."""
    if not cfg.synthetic_docs or os.path.exists(os.path.join(cfg.data_dir, "meta.json")):
        return
    with open(os.path.join(sweep_dir, ".prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(cfg.data_dir, "meta.json")):
            from data.prepare import prepare
            prepare([f"synthetic:{cfg.synthetic_docs}"], out=cfg.data_dir, train_tokenizer=cfg.tokenizer_vocab)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", required=True, help="the search space file (see config/sweep_tiny.py)")
    ap.add_argument("--n_trials", type=int, help="trials in the study, shared by all its workers (--grid: default "
                                                  "the grid's size)")
    ap.add_argument("--grid", action="store_true", help="every combination of the space's choices and variants once")
    ap.add_argument("--storage", help="sqlite:///..., postgresql://..., or journal:PATH (default: SQLite in the "
                                      "sweep dir)")
    ap.add_argument("--study", help="study name (default: the space file's name)")
    ap.add_argument("--nproc_per_node", type=int, default=1, help="> 1: each trial runs under torchrun")
    ap.add_argument("--sweep_dir", help="trial dirs and results (default: out/sweeps/STUDY)")
    ap.add_argument("--heartbeat", type=int, default=60, help="seconds between heartbeats (RDB storages)")
    ap.add_argument("--seed", type=int, help="the sampler's seed: reproducible single-worker sweeps")
    args, train_args = ap.parse_known_args(argv)
    try:
        cfg = train.load_config(train_args)
        space, objectives = load_space(args.space, train_args)
        grid = grid_of(space) if args.grid else []
        args.n_trials = args.n_trials or len(grid)
        if not args.n_trials:
            raise SweepError("--n_trials is required without --grid: how many trials the study runs")
        if args.n_trials < 1 or args.nproc_per_node < 1 or args.heartbeat < 1:
            raise SweepError("--n_trials, --nproc_per_node and --heartbeat must be at least 1")
        sweep = Sweep(train_args, space, "", cfg.early_stop_metric, args.nproc_per_node, args.n_trials, objectives)
        name = args.study or os.path.splitext(os.path.basename(args.space))[0]
        sweep.sweep_dir = args.sweep_dir or os.path.join("out", "sweeps", name)
        os.makedirs(sweep.sweep_dir, exist_ok=True)
        modes = [o.direction for o in objectives.values()] or [cfg.early_stop_mode]
        study, heartbeat = open_study(args.storage, name, ["minimize" if m == "min" else "maximize" for m in modes],
                                      sweep.sweep_dir, args.heartbeat, args.seed, grid)
        prepare_data_once(cfg, sweep.sweep_dir)
    except (SweepError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    base_args = [a for a in train_args if not a.startswith("--")]

    def progress(study, t):
        finished, _ = tally(study)
        if t.state == TrialState.PRUNED:
            what = f"at step {max(t.intermediate_values)}" if t.intermediate_values else ""
        elif t.user_attrs.get("crashed"):
            what = t.user_attrs["log_tail"][-1][:120] if t.user_attrs.get("log_tail") else ""
        elif t.user_attrs.get("surplus"):
            what = "not run: the budget was full"
        elif objectives:
            what = ", ".join(f"{n} {v:.4f}" for n, v in zip(objectives, t.values)) if t.values else ""
        else:
            what = f"{sweep.metric} {t.value:.4f}" if t.value is not None else ""
        complete = [x for x in study.get_trials(deepcopy=False) if x.state == TrialState.COMPLETE]
        best = f"; best {study.best_value:.4f} (trial {study.best_trial.number})" if complete and not objectives \
            else f"; {len(study.best_trials)} on the Pareto front" if complete else ""
        print(f"trial {t.number} {t.state.name.lower()} {what} {t.params} | {finished}/{args.n_trials} done{best} "
              f"| {time.time() - sweep.started:.0f}s", flush=True)
        write_results(study, sweep, base_args)

    while True:
        if heartbeat:
            fail_stale_trials(study)  # a dead worker's trial fails and is queued again
        finished, in_flight = tally(study)
        waiting = any(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False))
        if finished >= args.n_trials:
            break
        if finished + in_flight < args.n_trials or waiting:
            study.optimize(lambda trial: run_trial(trial, sweep), n_trials=1, catch=(TrialCrashed, Surplus),
                           callbacks=[progress])
        elif heartbeat:  # the last trials run on other workers: wait, in case one of them dies and is queued again
            time.sleep(min(args.heartbeat, 5))
        else:
            break
    write_results(study, sweep, base_args)
    written = [n for n in ("trials.md", "best.py", "history.png", "importances.png", "pareto.png")
               if os.path.exists(os.path.join(sweep.sweep_dir, n))]
    print(f"results in {sweep.sweep_dir}: {', '.join(written)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
