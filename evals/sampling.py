"""Where completions come from: a model (greedy or sampled, batched by prompt length) or a samples file.

  run = Run(Settings(tasks=["xml"]), model=model, tokenizer=tokenizer)
  texts, truncated = complete(model, tokenizer, ["<a>"], max_new_tokens=64)
  got = samples_for(run, "xml", [("xml/set-0", "<a>")], stop=())   # {task_id: [(completion, truncated)]}
"""
import dataclasses
import os

from tqdm import tqdm

from model.generate import cut_at_stop, generate

@dataclasses.dataclass
class Settings:
    tasks: list
    data_dir: str | None = None
    n_samples: int = 1  # samples per problem for pass@k (1 = greedy)
    temperature: float = 0.8
    max_new_tokens: int = 512
    batch_size: int = 16
    limit: int | None = None  # at most this many problems / prompts per task
    n_prompts: int = 50  # held-out document prompts per language
    workers: int = os.cpu_count() or 1  # parallel sandboxes
    seed: int = 0
    js_problems: str | None = None  # None: ours, data/js_problems.jsonl
    mbpp: str | None = None
    mmlu: str | None = None
    mmlu_shots: int = 5
    truthfulqa: str | None = None


@dataclasses.dataclass
class Run:
    settings: Settings
    model: object = None
    tokenizer: object = None
    samples: dict | None = None  # task -> task_id -> [completion], when scoring --samples
    sample_prompts: dict = dataclasses.field(default_factory=dict)
    sample_refs: dict = dataclasses.field(default_factory=dict)
    train_config: dict = dataclasses.field(default_factory=dict)  # train.py's config, for a training checkpoint
    train_world_size: int = 1


def gen_budget(model, max_new_tokens):
    """New tokens complete() can give: half the context at most, so prompts keep the other half."""
    return min(max_new_tokens, model.cfg.max_position_embeddings // 2)


def complete(model, tokenizer, prompts, max_new_tokens, stop=(), temperature=0.0, seed=0, batch_size=16,
             desc="generate"):
    """Completions for prompt strings, cut before the first stop string, and whether each ran out of tokens.
    Prompts that leave no room are cut from the left; batches group prompts of similar length."""
    max_pos = model.cfg.max_position_embeddings
    max_new = gen_budget(model, max_new_tokens)
    ids = [tokenizer.encode(p, add_special_tokens=False)[-(max_pos - max_new):] or [tokenizer.eos_token_id or 0]
           for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    texts, truncated = [None] * len(ids), [False] * len(ids)
    for b in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        rows = order[b:b + batch_size]
        n = min(max_new, max_pos - max(len(ids[i]) for i in rows))
        out = generate(model, [ids[i] for i in rows], max_new_tokens=n, temperature=temperature,
                       top_p=0.95 if temperature > 0 else None, stop=list(stop) or None, tokenizer=tokenizer,
                       seed=seed + b, eos_id=tokenizer.eos_token_id)
        for i, o in zip(rows, out):
            text = tokenizer.decode(o, skip_special_tokens=True)
            texts[i] = cut_at_stop(text, stop)
            truncated[i] = len(o) == n and texts[i] == text
    return texts, truncated


def samples_for(run, task, items, stop, n=1, max_new_tokens=None):
    """items [(task_id, prompt)] -> {task_id: [(completion, truncated)] * n}, from --samples or the model."""
    if run.samples is not None:
        got = run.samples.get(task, {})
        return {tid: [(cut_at_stop(c, stop), False) for c in got[tid]] for tid, _ in items if tid in got}
    s = run.settings
    temperature = s.temperature if n > 1 else 0.0
    prompts = [p for _, p in items for _ in range(n)]
    texts, trunc = complete(run.model, run.tokenizer, prompts, max_new_tokens or s.max_new_tokens, stop,
                            temperature, s.seed, s.batch_size, desc=f"{task}: generate")
    return {tid: list(zip(texts[i * n:(i + 1) * n], trunc[i * n:(i + 1) * n])) for i, (tid, _) in enumerate(items)}
