"""Training checkpoint -> Hugging Face model dir, and any checkpoint -> a model ready for inference.

  python -m model.export out/tiny/ckpt/step-001500 hf/tiny        # config, safetensors shards + index, tokenizer
  python -m model.export out/tiny hf/tiny --max_shard_size=500MB   # a run dir: its newest checkpoint that verifies
  python -m model.export s3://bucket/runs/tiny hf/tiny --pack zst  # a remote run; + hf/tiny.tar.zst to distribute
  python -m model.export out/tiny hf/tiny --gguf --gguf_type q8_0   # + hf/tiny.q8_0.gguf for llama.cpp and ollama

Every export carries a model card (README.md with the Hub's YAML front matter): how the checkpoint was trained, the
latest validate.py report of it, and how to prompt it for infilling.

    model, tokenizer_dir = load_for_inference("out/tiny/ckpt/step-001500")   # or an HF dir

ckpt.py stores and verifies the tensors and knows nothing of the model; this file gives them a shape.
"""
import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader

import ckpt
import remote
from data.fim import FIM_TOKENS
from evals import fmt
from model.gguf import GGUFError, check_type, gguf_path, gguf_vocab, write_gguf
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


# -----------------------------------------------------------------------------
# model card

VALIDATIONS = "validations.jsonl"  # in a run dir: validate.py appends {ckpt, report} there, the card reads it
HUB_DATASETS = ("the-stack-dedup", "the-stack-v2-dedup", "the-stack-v2", "the-stack", "starcoderdata")  # bigcode/...
LANG_TAGS = {"xml": "xml", "mdx": "mdx", "md": "markdown", "js": "javascript", "ts": "typescript", "py": "python"}


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_dir(ckpt_path):
    """The run dir that holds checkpoint dir `ckpt_path` (RUN/ckpt/step-N; `latest` followed)."""
    return os.path.dirname(os.path.dirname(os.path.realpath(ckpt_path)))


def _latest_report(ckpt_path):
    """report.json of the newest validate.py run on this checkpoint that still exists, or None."""
    ckpt_path = os.path.realpath(ckpt_path)
    try:
        with open(os.path.join(run_dir(ckpt_path), VALIDATIONS)) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None
    for rec in reversed(lines):
        report = _read_json(rec["report"]) if rec.get("ckpt") == os.path.basename(ckpt_path) else None
        if report:
            return report
    return None


def _base_card(init_from):
    """(Hub id, license) of the HF dir the run started from, from its config.json and model card."""
    from huggingface_hub import ModelCard
    if init_from == "scratch" or not os.path.isdir(init_from):
        return None, None
    name = (_read_json(os.path.join(init_from, "config.json")) or {}).get("_name_or_path") or \
        os.path.basename(os.path.normpath(init_from))
    readme = os.path.join(init_from, "README.md")
    return name, ModelCard.load(readme).data.license if os.path.isfile(readme) else None


def model_card(ckpt_path, state, meta, out_dir):
    """README.md text for the export of checkpoint `ckpt_path` (its train_state `state`, its data's meta.json)."""
    from huggingface_hub import ModelCard, ModelCardData
    cfg = state.get("config") or {}
    summary = _read_json(os.path.join(run_dir(ckpt_path), "summary.json")) or {}
    if summary.get("run_id") != state.get("run_id"):
        summary = {}  # another run's summary, or none yet
    base, license = _base_card(cfg.get("init_from", "scratch"))
    langs = sorted((meta.get("stats") or {}).keys())
    paths = [str(s.get("path", "")) for s in meta.get("sources") or []]
    datasets = sorted({f"bigcode/{d}" for p in paths for d in HUB_DATASETS if d in re.split(r"[/\\]", p)})
    fim = meta.get("fim")
    data = ModelCardData(base_model=base, license=license, language=["code", "en"], pipeline_tag="text-generation",
                         library_name="transformers", datasets=datasets or None,
                         tags=["sheikh-coder", "code", *[LANG_TAGS[x] for x in langs if x in LANG_TAGS]]
                         + ["fill-in-the-middle"] * bool(fim and cfg.get("fim_rate")))
    mix = cfg.get("mixture") or {}
    mixture = ", ".join(f"{x} {mix[x]:.0%}" for x in mix) if mix else "by token count: " + ", ".join(
        f"{x} {v['train']['tokens']:,}" for x, v in (meta.get("stats") or {}).items())
    decon = meta.get("decontamination")
    decon = (f"{decon['ngram']}-gram overlap with " + ", ".join(decon["benchmarks"]) + " removed: "
             + ", ".join(f"{k} {v['docs']} docs" for k, v in (meta.get("contaminated") or {}).items())
             if isinstance(decon, dict) else "off")
    expand = cfg.get("expand_layers", 0)
    rows = [("checkpoint", f"step {state['step']:,} of run `{state.get('run_id')}`"),
            ("tokens seen", f"{state.get('tokens', 0):,}"),
            ("started from", base or "random weights (scratch)"),
            ("data", f"{', '.join(langs) or 'n/a'}; mixture {mixture}"),
            ("expansion", f"{expand} inserted blocks (LLaMA-Pro), "
                          f"{'only those trained' if cfg.get('train_only_new_layers') else 'all weights trained'}"
             if expand else "none"),
            ("context", f"{cfg.get('block_size')} tokens (RoPE scaling x{cfg.get('rope_scaling_factor', 1.0)})"),
            ("fill-in-the-middle", f"rate {cfg.get('fim_rate', 0)}, of which SPM {cfg.get('fim_spm_rate', 0)}"),
            ("decontamination", decon),
            ("stop reason", summary.get("stop_reason") or "n/a (the run has not finished)")]
    body = [f"# {os.path.basename(os.path.normpath(out_dir))}", "",
            f"A Phi model (`PhiForCausalLM`) trained with sheikh-coder (raw PyTorch, FSDP2) on "
            f"{', '.join(langs)}.", "", "## Training", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    report = _latest_report(ckpt_path)
    body += ["", "## Evaluation", ""]
    if report:
        runs = report["runs"]
        body += [f"The latest `validate.py` report on this checkpoint ({report['created']})"
                 + (f", beside `{runs[1]['ckpt']}`" if len(runs) > 1 else "") + ":", "",
                 "| task | metric | this model |" + (" compared |" if len(runs) > 1 else ""),
                 "|---|---|---|" + ("---|" if len(runs) > 1 else "")]
        for task, metrics in runs[0]["tasks"].items():
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seconds":
                    other = runs[1]["tasks"].get(task, {}).get(k, "") if len(runs) > 1 else None
                    body.append(f"| {task} | {k} | {fmt(v)} |" + (f" {fmt(other)} |" if other is not None else ""))
    else:
        body.append(f"Not validated yet: `python validate.py --ckpt {ckpt_path}` (then export again).")
    body += ["", "## Infilling", ""]
    if fim:
        names = {k: FIM_TOKENS[k] for k in ("prefix", "suffix", "middle")}
        body += ["The tokenizer holds the fill-in-the-middle sentinels "
                 + ", ".join(f"`{t}` (id {fim[k]})" for k, t in names.items())
                 + f". Trained with a FIM rate of {cfg.get('fim_rate', 0)}"
                 + ("" if cfg.get("fim_rate") else " (so these prompts are untrained)") + ". Prompt with either order; "
                 "the model writes the middle, then the end-of-text token:", "", "```text",
                 f"PSM: {names['prefix']}{{prefix}}{names['suffix']}{{suffix}}{names['middle']}",
                 f"SPM: {names['prefix']}{names['suffix']}{{suffix}}{names['middle']}{{prefix}}", "```"]
    else:
        body.append("The tokenizer has no FIM sentinels: this model completes left to right only.")
    if os.path.isfile(os.path.join(out_dir, "loss.png")):
        body += ["", "## Loss", "", "![train and val loss](loss.png)"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(body) + "\n")


def export(ckpt_path, out_dir, max_shard_size="2GB", gguf_type=None):
    """Write an HF model dir from a training checkpoint (weights, config, the run's tokenizer, a model card),
    and with gguf_type the GGUF file beside it (gguf_path); returns out_dir."""
    if gguf_type:
        check_type(gguf_type)
    model, state = _model_from_ckpt(ckpt_path)
    meta = _data_meta(state)
    tok = _tokenizer_dir(meta)
    if gguf_type:  # a missing tokenizer, or one llama.cpp cannot read, fails here, before anything is written
        if tok is None:
            raise GGUFError(f"{ckpt_path}: no tokenizer for the GGUF file (its config.data_dir/meta.json names none "
                            f"that exists here): export where the run's data dir is, or without --gguf")
        gguf_vocab(tok)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    mode = os.stat(os.path.join(out_dir, "config.json")).st_mode & 0o777  # what the umask gives
    for name in os.listdir(out_dir):  # save_pretrained leaves the weights 0600: unreadable to a cluster's others
        if name.endswith((".safetensors", ".safetensors.index.json")):
            os.chmod(os.path.join(out_dir, name), mode)
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
    loss_png = os.path.join(run_dir(ckpt_path), "loss.png")
    if os.path.isfile(loss_png):
        shutil.copy2(loss_png, os.path.join(out_dir, "loss.png"))
    model_card(ckpt_path, state, meta, out_dir).save(os.path.join(out_dir, "README.md"))
    if gguf_type:
        write_gguf(out_dir, gguf_path(out_dir, gguf_type), gguf_type)
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
    ap.add_argument("--gguf", action="store_true", help="also write OUT.<GGUF_TYPE>.gguf for llama.cpp and ollama")
    ap.add_argument("--gguf_type", help="f16 (default) or q8_0")
    args = ap.parse_args(argv)
    try:
        if args.gguf_type and not args.gguf:
            raise GGUFError("--gguf_type needs --gguf")
        gguf_type = (args.gguf_type or "f16") if args.gguf else None
        with tempfile.TemporaryDirectory() as tmp:  # a URL's checkpoint is downloaded (and verified) here
            path = remote.pull(args.ckpt, tmp) if "://" in args.ckpt else ckpt.resolve(args.ckpt)
            print(export(path, args.out, args.max_shard_size, gguf_type))
        if gguf_type:
            print(gguf_path(args.out, gguf_type))
        if args.pack:
            print(remote.pack(args.out, f"{args.out.rstrip('/')}.tar.{args.pack}"))
    except (ckpt.CheckpointError, ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
