"""Issue 26: slurm/prepare.sbatch and slurm/train.sbatch on a real Slurm. The fixture starts Debian's munged,
slurmctld and slurmd (apt-get install munge slurmctld slurmd slurm-client; .ci/run does) as one node on
127.0.0.1: proctrack/linuxproc and task/none, so no cgroups are needed, munge auth with a key of its own. The
prepare array runs 3 shards and joins them; a training job of 2 tasks (two "nodes" of 1 gloo rank each) is stopped
as the time limit would stop it, requeues itself and resumes, with every loss of a single-launcher run."""
import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from helpers import QUICK, ROOT, free_port, run_train, stop, train_losses

pytestmark = [pytest.mark.slow, pytest.mark.slurm]  # -m slurm: this file alone (it needs root and the packages)
STEPS = 12


def slurm_conf(d, ports, user):
    return f"""ClusterName=sheikh
SlurmctldHost={socket.gethostname().split(".")[0]}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={d}/munge.socket,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerParameters=sched_interval=1,bf_interval=1
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=8 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm on 127.0.0.1, its own munge key and socket, requeued jobs held 10 s (cred_expire) rather
    than 120, then started within a second (the schedulers' intervals: else up to 60 s later); -> the env its
    commands need."""
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        os.makedirs(d / sub)
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (d / "slurm.conf").write_text(slurm_conf(d, (free_port(), free_port()), getpass.getuser()))
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf"),
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}  # python and torchrun: this one
    daemons = []
    try:
        for cmd in ([shutil.which("munged") or "munged", "-F", "--force", f"--socket={d}/munge.socket",
                     f"--key-file={key}", f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
                     f"--seed-file={d}/munged.seed"],
                    ["slurmctld", "-D", "-f", str(d / "slurm.conf")],
                    ["slurmd", "-D", "-N", "localhost", "-f", str(d / "slurm.conf")]):
            daemons.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(0.5)
        deadline = time.time() + 60
        while run(env, "sinfo", "-h", "-o", "%t", check=False).stdout.strip() != "idle":
            for p in daemons:
                assert p.poll() is None, f"{p.args[0]} exited:\n{logs(d)}"
            assert time.time() < deadline, f"the node did not come up idle:\n{logs(d)}"
            time.sleep(0.3)
        yield env
    finally:
        run(env, "scancel", f"--user={getpass.getuser()}", check=False)
        for p in reversed(daemons):
            stop(p, 15)


def logs(d):
    return "\n".join(f"== {n}\n" + (d / n).read_text()[-2000:] for n in ("munged.log", "slurmctld.log", "slurmd.log")
                     if (d / n).exists())


def run(env, *cmd, check=True):
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert not check or r.returncode == 0, f"{' '.join(cmd)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def job(env, job_id):
    """scontrol's fields of a job, e.g. JobState, Restarts."""
    fields = run(env, "scontrol", "-o", "show", "job", job_id).stdout.split()
    return dict(f.split("=", 1) for f in fields if "=" in f)


def wait_for(cond, what, log, timeout=300):
    deadline = time.time() + timeout
    while not cond():
        text = log.read_text()[-4000:] if log.exists() else ""
        assert time.time() < deadline, f"timed out waiting for {what}:\n{text}"
        time.sleep(0.2)


def test_prepare_array_then_train_requeued(tmp_path, tiny_data, slurm):
    data = tmp_path / "data"
    # three shards, one array task each, at once (8 CPUs declared); the last to finish joins them
    r = run(slurm, "sbatch", "--wait", "--array=0-2", "--cpus-per-task=1", f"--output={tmp_path}/prepare-%a.out",
            "slurm/prepare.sbatch", "synthetic:600", "--out", str(data), "--tokenizer", f"{tiny_data}/tokenizer",
            check=False)
    outs = "".join(p.read_text() for p in sorted(tmp_path.glob("prepare-*.out")))
    assert r.returncode == 0, outs
    meta = json.loads((data / "meta.json").read_text())
    assert meta["join"]["shards"] == 3 and "shard 0/3" in outs and "shard 2/3" in outs

    def train(out):  # 2 ranks x 2 sequences: QUICK's global batch
        return [*QUICK, f"--data_dir={data}", f"--out_dir={out}", f"--max_iters={STEPS}", "--eval_interval=4",
                "--ckpt_interval=4", "--batch_size=2"]
    out, log = tmp_path / "run", tmp_path / "train.out"
    env = {**slurm, "RDZV_PORT": str(free_port()), "LOG_DIR": str(tmp_path / "logs")}
    job_id = run(env, "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", f"--output={log}",
                 "slurm/train.sbatch", *train(out)).stdout.strip()
    # the time limit is near: Slurm sends USR1 to the batch script (--signal=B:USR1@600), as here
    wait_for(lambda: (out / "metrics.jsonl").exists() and "step 5 |" in log.read_text(), "step 5", log)
    run(slurm, "scancel", "--signal=USR1", "--batch", job_id)
    wait_for(lambda: job(slurm, job_id)["JobState"] == "PENDING", "the requeue", log)
    assert job(slurm, job_id)["Restarts"] == "1"  # it starts again after the requeue delay: cred_expire, 10 s here
    wait_for(lambda: job(slurm, job_id)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"), "the job's end", log)
    text = log.read_text()
    assert job(slurm, job_id)["JobState"] == "COMPLETED", text[-4000:]
    stopped = [line for line in text.splitlines() if "stopped at step " in line]
    assert len(stopped) == 2 and "signal SIGTERM" in stopped[0] and f"reached max_iters={STEPS}" in stopped[1], text
    step = int(stopped[0].split("stopped at step ")[1].split(":")[0])
    assert 5 <= step < STEPS and f"resumed from {out}/ckpt/step-{step:06d} at step {step}" in text
    for node in (0, 1):  # every rank's own logs, per node and attempt
        assert list((tmp_path / "logs" / job_id / f"node{node}").glob("*/attempt_0/0/stdout.log")), node

    ref = tmp_path / "ref"  # one launcher of 2 ranks on the same data
    run_train(train(ref), nproc=2)
    losses, ref_losses = train_losses(out), train_losses(ref)
    assert losses == ref_losses, {s: (losses.get(s), v) for s, v in ref_losses.items() if losses.get(s) != v}
    # no step twice: the requeued job went on from the checkpoint of the step the first one stopped at
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, STEPS + 1))
