"""train.py as users run it: configs and their errors, loss equivalence across parallelism, early stopping, signals."""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import QUICK, ROOT, free_port, read_jsonl, run_train, train_losses

import train


# -- config --------------------------------------------------------------------------------------------------------

def test_config_files_then_flags_override(tmp_path):
    extra = tmp_path / "extra.py"
    extra.write_text("batch_size = 3\nlearning_rate = 1  # an int where a float is expected is fine\n")
    cfg = train.load_config(["config/tiny.py", str(extra), "--batch_size=5", "--mixture={'xml': 1.0}"])
    # 1500: config/tiny.py's max_iters, which nothing later overrides
    assert (cfg.batch_size, cfg.learning_rate, cfg.mixture, cfg.max_iters) == (5, 1.0, {"xml": 1.0}, 1500)


def test_phi2_configs_resolve():
    big = train.load_config(["config/phi2_xml.py"])
    one = train.load_config(["config/phi2_xml_1gpu.py"])
    assert (big.expand_layers, big.block_size, big.learning_rate, big.warmup_iters) == (5, 32768, 1e-4, 1000)
    assert big.batch_size * big.grad_accum * 8 == one.batch_size * one.grad_accum  # same global batch
    assert (big.train_tokens, big.max_iters, big.fim_rate) == (500e9, 0, 0.5) and set(big.mixture) >= {"py", "txt"}


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["config/tiny.py", "--batch_szie=4"],
     "unknown config key 'batch_szie' in flag --batch_szie=4; did you mean 'batch_size'?"),
    (["config/tiny.py", "--batch_size=four"],
     "config key 'batch_size' in flag --batch_size=four must be int, got str 'four'"),
    (["config/nope.py"], "config file 'config/nope.py' not found; pass a path such as config/tiny.py"),
    (["config/tiny.py", "--batch_size=0"], "config key 'batch_size' must be > 0, got 0"),
    (["config/tiny.py", "--fsdp=zero3"],
     "config key 'fsdp' must be one of full_shard, shard_grad_op, hybrid, none, got 'zero3'"),
    (["config/tiny.py", "--fim_rate=1.5"],
     "config key 'fim_rate' must be a fraction in [0, 1], got 1.5 (StarCoder used 0.5)"),
    (["config/tiny.py", "--train_tokens=1e6"],
     "set exactly one of max_iters (steps) and train_tokens (a token budget), got max_iters=1500 and "
     "train_tokens=1e+06: --max_iters=0 trains by tokens"),
])
def test_config_errors_are_one_line(args, message):
    r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: {message}"


def test_lr_schedules():
    cfg = train.Config(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert train.get_lr(cfg, 0, 1.0) == pytest.approx(0.1)
    assert train.get_lr(cfg, 9, 1.0) == pytest.approx(1.0)
    assert train.get_lr(cfg, 60, 1.0) == pytest.approx(0.55)  # halfway through the cosine
    assert train.get_lr(cfg, 110, 0.5) == pytest.approx(0.05)
    wsd = train.Config(learning_rate=1.0, min_lr=0.0, warmup_iters=10, max_iters=100, lr_schedule="wsd",
                       wsd_decay_frac=0.2)
    assert [train.get_lr(wsd, s, 1.0) for s in (50, 79, 90, 100)] == pytest.approx([1.0, 1.0, 0.5, 0.0])


def test_guard_skips_spikes_and_nan():
    cfg, guard = train.Config(guard_warmup=5), train.Guard()
    for i in range(10):
        assert train.guard_verdict(guard, cfg, 3.0 + 0.01 * (i % 2), 1.0) is None
    assert "non-finite" in train.guard_verdict(guard, cfg, float("nan"), 1.0)
    assert "std above its running mean" in train.guard_verdict(guard, cfg, 9.0, 1.0)
    assert "grad norm" in train.guard_verdict(guard, cfg, 3.0, 50.0)
    assert guard.good_steps == 10  # skipped steps do not move the statistics


def test_checkpoints_from_before_the_guard_split_resume():
    """Older checkpoints kept the guard's statistics inside early_stop; they resume with the same numbers."""
    old = dict(step=7, tokens=70, early_stop=dict(best=2.5, best_step=4, bad_evals=1, lr_reductions=0, lr_scale=0.5,
                                                  loss_mean=2.6, loss_var=0.01, gnorm_mean=0.9, good_steps=7, skips=0,
                                                  rollbacks=1))
    p = train.restore_progress(old)
    assert (p.step, p.tokens, p.early_stop.best, p.early_stop.lr_scale) == (7, 70, 2.5, 0.5)
    assert (p.guard.loss_mean, p.guard.good_steps, p.guard.rollbacks) == (2.6, 7, 1)
    new = dict(step=7, tokens=70, early_stop=dataclasses.asdict(p.early_stop), guard=dataclasses.asdict(p.guard))
    assert train.restore_progress(new) == p


def test_early_stop_direction_is_explicit():
    """"max" metrics improve upwards, with min_delta, and no negation anywhere."""
    cfg = train.Config(early_stop_metric="domain_valid", early_stop_mode="max", patience=1, min_delta=0.05,
                       max_lr_reductions=0)
    es = train.EarlyStop()
    assert train.eval_decision(es, cfg, {"domain_valid": 0.2}, 0) == (None, None) and es.best == 0.2
    assert train.eval_decision(es, cfg, {"domain_valid": 0.3}, 1) == (None, None) and es.best_step == 1
    action, why = train.eval_decision(es, cfg, {"domain_valid": 0.33}, 2)  # +0.03 < min_delta
    assert action == "stop" and "best 0.3000 at step 1" in why
    with pytest.raises(ValueError, match="early_stop_metric 'domain_valid' is not an eval metric; choose one of "
                                         "val_loss"):
        train.eval_decision(es, cfg, {"val_loss": 1.0}, 3)


# -- loss equivalence across parallelism (same global batch, seed and data) ----------------------------------------

def quick(tmp_path, tiny_data, name, *extra, nproc=1, check=True):
    out = str(tmp_path / name)
    r = run_train([*QUICK, f"--out_dir={out}", f"--data_dir={tiny_data}", *extra], nproc=nproc, check=check)
    return out, r


def first_losses(out, n=10):
    losses = train_losses(out)
    return [losses[s] for s in range(1, n + 1)]


@pytest.mark.slow
def test_loss_equivalence_fsdp_and_accumulation(tmp_path, tiny_data):
    args = ["--max_iters=10", "--eval_interval=1000", "--ckpt_interval=1000"]
    ref = first_losses(quick(tmp_path, tiny_data, "none", *args, "--fsdp=none")[0])
    full = first_losses(quick(tmp_path, tiny_data, "full", *args, "--batch_size=2", nproc=2)[0])
    grad_op = first_losses(quick(tmp_path, tiny_data, "grad_op", *args, "--batch_size=2", "--fsdp=shard_grad_op",
                                 nproc=2)[0])
    accum = first_losses(quick(tmp_path, tiny_data, "accum", *args, "--fsdp=none", "--batch_size=1",
                               "--grad_accum=4")[0])
    assert ref[-1] < ref[0]  # it learns
    for other in (full, grad_op, accum):
        assert max(abs(a - b) for a, b in zip(ref, other)) <= 1e-4, (ref, other)


@pytest.mark.slow
def test_activation_checkpointing_keeps_losses(tmp_path, tiny_data):
    args = ["--max_iters=5", "--eval_interval=1000", "--ckpt_interval=1000", "--fsdp=none"]
    ref = first_losses(quick(tmp_path, tiny_data, "ac_none", *args)[0], 5)
    for mode in ("full", "selective", "op"):
        got = first_losses(quick(tmp_path, tiny_data, f"ac_{mode}", *args, f"--activation_checkpointing={mode}")[0], 5)
        assert max(abs(a - b) for a, b in zip(ref, got)) <= 1e-5


def test_op_ac_recomputes_all_but_matmuls_with_the_same_gradients():
    """Per-op AC (selective checkpointing with model/parallel.py's policy): the loss and every gradient equal AC
    none's bit for bit, dropout included; backward recomputes LayerNorm and GELU but no matmul and no attention,
    where full AC recomputes them all."""
    import copy
    from collections import Counter

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from model.parallel import apply_ac
    from model.phi import Phi, PhiConfig

    class Ops(TorchDispatchMode):  # counts the aten ops backward runs
        def __init__(self):
            super().__init__()
            self.n = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))
    torch.manual_seed(0)
    ref = Phi(dataclasses.replace(PhiConfig.preset("test"), resid_pdrop=0.1))
    x = torch.randint(0, 128, (2, 33))
    got = {}
    for mode in ("none", "op", "full"):
        model = copy.deepcopy(ref)
        apply_ac(model, mode, 1)
        torch.manual_seed(1)  # the same dropout masks
        loss = model(x[:, :-1], x[:, 1:])[1]
        with Ops() as ops:
            loss.backward()
        got[mode] = loss, {k: p.grad for k, p in model.named_parameters()}, ops.n
    (loss, grads, none), (op_loss, op_grads, op) = got["none"], got["op"]
    assert torch.equal(op_loss, loss) and all(torch.equal(op_grads[k], g) for k, g in grads.items())
    assert none["native_layer_norm"] == none["gelu"] == 0 and op["native_layer_norm"] == op["gelu"] == 2  # 2 blocks
    assert op["addmm"] == none["addmm"] == 0 < got["full"][2]["addmm"] and op["mm"] == none["mm"]  # Linear: addmm
    attention = "_scaled_dot_product_flash_attention_for_cpu"
    assert op[attention] == none[attention] == 0 < got["full"][2][attention]


# -- early stopping ------------------------------------------------------------------------------------------------

def summary(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def events(out):
    return [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "event" in r]


@pytest.mark.slow
def test_plateau_cuts_lr_then_stops(tmp_path, tiny_data):
    # LR 0: the val loss cannot move, so every eval after the first is a plateau
    out, r = quick(tmp_path, tiny_data, "plateau", "--max_iters=100", "--learning_rate=1e-12", "--min_lr=0",
                   "--eval_interval=2", "--ckpt_interval=50", "--patience=2", "--max_lr_reductions=1",
                   "--min_delta=0.01")
    kinds = [e["event"] for e in events(out)]
    assert kinds == ["lr_reduced", "stop"]
    reason = summary(out)["stop_reason"]
    assert reason.startswith("early stop: val_loss did not improve by 0.01 for 2 evals (best ")
    assert "at step 0)" in reason
    assert summary(out)["steps"] == 8  # evals at 0 (best), 2, 4 (cut), 6, 8 (stop)
    assert "stopped at step 8: early stop" in r.stdout


@pytest.mark.slow
def test_nan_step_is_skipped(tmp_path, tiny_data):
    out, _ = quick(tmp_path, tiny_data, "nan", "--max_iters=12", "--eval_interval=100", "--ckpt_interval=100",
                   "--fault_nan_steps=[5]")
    skips = [e for e in events(out) if e["event"] == "skip"]
    # attempt 5 trains step 4
    assert len(skips) == 1 and skips[0]["step"] == 4 and "non-finite loss" in skips[0]["reason"]
    assert summary(out)["steps"] == 12 and summary(out)["stop_reason"] == "reached max_iters=12"
    assert all(math.isfinite(v) for v in train_losses(out).values())


@pytest.mark.slow
def test_repeated_divergence_rolls_back_then_stops(tmp_path, tiny_data):
    out, _ = quick(tmp_path, tiny_data, "diverge", "--max_iters=40", "--eval_interval=100", "--ckpt_interval=4",
                   f"--fault_nan_steps={list(range(6, 40))}", "--max_skips=2", "--max_rollbacks=2")
    kinds = [e["event"] for e in events(out)]
    assert kinds.count("rollback") == 2 and kinds[-1] == "stop"
    rollbacks = [e for e in events(out) if e["event"] == "rollback"]
    assert all(e["step"] == 4 and "back to step-000004" in e["reason"] for e in rollbacks)
    assert "LR scale 0.25" in rollbacks[1]["reason"]
    assert summary(out)["stop_reason"].startswith("diverged: 2 rollbacks did not help (non-finite loss")


# -- signals -------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_two_ranks_saves_and_exits_zero(tmp_path, tiny_data):
    import ckpt
    out = str(tmp_path / "sigterm")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "train.py", *QUICK, f"--out_dir={out}", f"--data_dir={tiny_data}", "--max_iters=100000",
           "--eval_interval=100000", "--ckpt_interval=100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 180
    while time.time() < deadline and not (os.path.exists(metrics) and len(train_losses(out)) >= 3):
        time.sleep(0.5)
    assert len(train_losses(out)) >= 3, "the run logged no steps within 180 s"
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    for pid in workers:
        os.kill(int(pid), signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log[-3000:]
    assert "stopped at step" in log and "signal SIGTERM" in log
    path = ckpt.find_resume(out, "auto")
    assert path is not None and ckpt.verify(path) == []
    assert summary(out)["stop_reason"] == "signal SIGTERM"


@pytest.mark.slow
def test_init_from_hf_dir_with_expansion_keeps_function(tmp_path, tiny_data):
    import torch
    from model.phi import Phi, PhiConfig
    torch.manual_seed(0)
    base = Phi(dataclasses.replace(PhiConfig.preset("tiny"), vocab_size=512))
    base.init_weights()
    base.save_pretrained(str(tmp_path / "hf"))
    args = ["--max_iters=2", "--eval_interval=1000", "--ckpt_interval=2", f"--init_from={tmp_path / 'hf'}"]
    plain = first_losses(quick(tmp_path, tiny_data, "plain", *args, "--fsdp=none")[0], 2)
    grown_dir, _ = quick(tmp_path, tiny_data, "grown", *args, "--expand_layers=2", "--train_only_new_layers=True",
                         "--batch_size=2", nproc=2)
    grown = first_losses(grown_dir, 2)
    assert abs(plain[0] - grown[0]) <= 1e-5  # the inserted blocks start as the identity
    exported = Phi.from_pretrained(os.path.join(grown_dir, "best"))
    assert exported.cfg.num_hidden_layers == 6  # 4 + 2, new blocks at 2 and 5
    sd, old = exported.state_dict(), base.state_dict()
    for new, src in ((0, 0), (1, 1), (3, 2), (4, 3)):  # frozen blocks did not move
        for k in ("self_attn.q_proj.weight", "mlp.fc1.bias"):
            assert torch.equal(sd[f"model.layers.{new}.{k}"], old[f"model.layers.{src}.{k}"])
    assert not torch.equal(sd["model.layers.2.mlp.fc2.weight"], torch.zeros_like(sd["model.layers.2.mlp.fc2.weight"]))


@pytest.mark.slow
def test_config_json_records_the_batch_auto_batch_size_chose(tmp_path, tiny_data):
    # the fault hook makes micro-batches above 2 "run out of memory": 8 -> 4 -> 2, grad_accum 1 -> 4
    out, r = quick(tmp_path, tiny_data, "auto", "--max_iters=1", "--eval_interval=1000", "--ckpt_interval=1000",
                   "--batch_size=8", "--auto_batch_size=True", "--fault_oom_above=2")
    with open(os.path.join(out, "config.json")) as f:
        saved = json.load(f)
    assert (saved["batch_size"], saved["grad_accum"]) == (2, 4)
    assert summary(out)["tokens"] == 2 * 4 * 64  # one step of the same global batch


@pytest.mark.slow
def test_tokenizer_larger_than_model_is_refused(tmp_path, tiny_data):
    from model.phi import Phi, PhiConfig
    small = Phi(dataclasses.replace(PhiConfig.preset("tiny"), vocab_size=256))  # the data's tokenizer has 512
    small.init_weights()
    small.save_pretrained(str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "train.py", *QUICK, f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'o'}",
                        f"--init_from={tmp_path / 'hf'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip() == ("error: tokenizer vocabulary (512) is larger than the model's (256); "
                                "prepare the data with the model's tokenizer")
    assert not os.path.exists(tmp_path / "o" / "ckpt")
