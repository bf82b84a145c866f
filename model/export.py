"""Training checkpoint -> Hugging Face model dir, and any checkpoint -> a model ready for inference.

  python -m model.export out/tiny/ckpt/step-002000 hf/tiny        # config, safetensors shards + index, tokenizer
  python -m model.export out/tiny hf/tiny --max_shard_size=500MB   # a run dir: its newest checkpoint that verifies
  python -m model.export s3://bucket/runs/tiny hf/tiny --pack zst  # a remote run; + hf/tiny.tar.zst to distribute

    model, tokenizer_dir = load_for_inference("out/tiny/ckpt/step-002000")   # or an HF dir

ckpt.py stores and verifies the tensors and knows nothing of the model; this file gives them a shape.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader

import ckpt
import remote
from model.phi import ModelLoadError, Phi, PhiConfig


def _data_meta(state):
    """The run's {config.data_dir}/meta.json (tokenizer dir, eos_id), or {} when it is not there."""
    data_dir = (state.get("config") or {}).get("data_dir")
    path = os.path.join(data_dir, "meta.json") if data_dir else ""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _tokenizer_dir(meta):
    tok = meta.get("tokenizer")
    return tok if tok and os.path.isdir(tok) else None


def _model_tensors(path):
    """The full (unsharded) model tensors of checkpoint `path`, keyed by parameter name, whatever the
    number of ranks that saved it: DCP's HuggingFaceStorageReader reassembles the shards. One process;
    verifies the checkpoint first."""
    problems = ckpt.verify(path)
    if problems:
        raise ckpt.CheckpointError(f"cannot read {path}: {problems[0]}")
    reader = HuggingFaceStorageReader(path)
    meta = reader.read_metadata().state_dict_metadata
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items() if k.startswith("model.")}
    ckpt._dcp_call(lambda: dcp.load(tensors, storage_reader=reader, no_dist=True), f"reading {path}")
    return {k[len("model."):]: v for k, v in tensors.items()}


def _model_from_ckpt(path, dtype=torch.float32, device="cpu"):
    state = ckpt.train_state(path)
    if state is None or "model_config" not in state:
        raise ckpt.CheckpointError(f"{path}: not a checkpoint saved by train.py (no manifest.json or model_config)")
    cfg = PhiConfig.from_dict(state["model_config"])
    with torch.device("meta"):  # weights exist in memory once, as in Phi.from_pretrained
        model = Phi(cfg)
    sd = _model_tensors(path)
    if set(sd) != set(model.state_dict()):
        diff = sorted(set(sd) ^ set(model.state_dict()))
        raise ckpt.CheckpointError(f"{path}: weights do not match model_config ({len(diff)} keys differ, "
                                   f"e.g. {diff[0]})")
    model.load_state_dict({k: sd.pop(k).to(device=device, dtype=dtype) for k in list(sd)}, assign=True)
    model.init_rope()
    return model, state


def export(ckpt_path, out_dir, max_shard_size="2GB"):
    """Write an HF model dir from a training checkpoint (weights, config, the run's tokenizer); returns out_dir."""
    model, state = _model_from_ckpt(ckpt_path)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    meta = _data_meta(state)
    tok = _tokenizer_dir(meta)
    if tok is None:
        warnings.warn(f"{ckpt_path}: no tokenizer found via config.data_dir/meta.json; exported without one")
    else:
        for name in os.listdir(tok):
            if os.path.isfile(os.path.join(tok, name)):
                shutil.copy2(os.path.join(tok, name), os.path.join(out_dir, name))
    ids = {"bos_token_id": meta["eos_id"], "eos_token_id": meta["eos_id"]} if "eos_id" in meta else {}
    with open(os.path.join(out_dir, "config.json")) as f:  # HF's PhiConfig defaults to bos 1 / eos 2
        config = json.load(f)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**config, **ids}, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"_from_model_config": True, **ids}, f, indent=2)
    return out_dir


def load_for_inference(path, dtype=torch.float32, device="cpu"):
    """(Phi in eval mode, tokenizer dir or None) from a training checkpoint or an HF export dir."""
    if ckpt.train_state(path) is not None:
        model, state = _model_from_ckpt(path, dtype, device)
        return model.eval(), _tokenizer_dir(_data_meta(state))
    if os.path.isfile(os.path.join(path, "config.json")):
        model = Phi.from_pretrained(path, dtype=dtype, device=device)
        has_tok = any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json"))
        return model.eval(), path if has_tok else None
    raise ckpt.CheckpointError(f"{path} is neither a training checkpoint (manifest.json) nor an HF dir (config.json)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="checkpoint dir (out/ckpt/step-000123) or run dir (its newest that verifies)")
    ap.add_argument("out", help="output dir for the HF model")
    ap.add_argument("--max_shard_size", default="2GB", help="largest safetensors shard (default 2GB)")
    ap.add_argument("--pack", choices=["zst", "gz", "bz2", "xz"], help="also write OUT.tar.<PACK> of the HF dir")
    args = ap.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:  # a URL's checkpoint is downloaded (and verified) here
            path = remote.pull(args.ckpt, tmp) if "://" in args.ckpt else ckpt.resolve(args.ckpt)
            print(export(path, args.out, args.max_shard_size))
        if args.pack:
            print(remote.pack(args.out, f"{args.out.rstrip('/')}.tar.{args.pack}"))
    except (ckpt.CheckpointError, ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
