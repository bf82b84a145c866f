"""Shared fixtures: one small prepared corpus and one trained tiny run serve the whole suite."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 cores shared by test processes: oversubscription costs 2x

import sys

import pytest

from helpers import ROOT, S3, run_train, stop

sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic corpus with a trained BPE tokenizer, prepared once through data/prepare.py."""
    from data.prepare import prepare
    out = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare(["synthetic:600"], out=out, train_tokenizer=512)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The README's `python train.py config/tiny.py`, data preparation included, in a temporary place;
    its checkpoints serve the monitor, ckpt and validate tests."""
    root = tmp_path_factory.mktemp("run")
    out = str(root / "tiny")
    # both cores: nothing else runs while a session fixture is built (4.5 min on two)
    run_train(["config/tiny.py", f"--out_dir={out}", f"--data_dir={root / 'data'}"], timeout=1200,
              env={"OMP_NUM_THREADS": "2"})
    return out


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 with a bucket "ckpts" (helpers.S3); its env holds the credentials."""
    server = S3(tmp_path_factory.mktemp("s3"))
    yield server
    stop(server.proc)
