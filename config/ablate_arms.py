# The arms of the recipe ablation (python ablate.py): ways to continue pre-training the base, each with 2 seeds
# (the data order), in one multi-objective sweep.py study. The expansion is LLaMA-Pro's ratio: 1 block on 4 (8 on 32).
_NEW = {"xml": 0.3, "mdx": 0.2, "js": 0.3, "md": 0.2}


def _replay(share):  # the base's own mixture (py 0.8, txt 0.2) for `share` of the tokens
    return {**{k: round(v * (1 - share), 4) for k, v in _NEW.items()}, "py": round(0.8 * share, 4),
            "txt": round(0.2 * share, 4)}


arm = variants(
    a=dict(),                                              # all weights, no replay: today's recipe
    b=dict(expand_layers=1, train_only_new_layers=True),   # LLaMA-Pro: only the inserted block trains
    c=dict(expand_layers=1),                               # the inserted block, and every weight trains
    d10=dict(mixture=_replay(0.10)),                       # all weights, 10% replay
    d25=dict(mixture=_replay(0.25)),                       # all weights, 25% replay
    e_b=dict(expand_layers=1, train_only_new_layers=True, mixture=_replay(0.25)),  # b and c with replay: the
    e_c=dict(expand_layers=1, mixture=_replay(0.25)),      # better of the two is the arm e
)
seed = choice([1, 2])
gain = objective("min", "val_loss/xml", "val_loss/mdx", "val_loss/js", "val_loss/md")
retention = objective("min", "val_loss/py", "val_loss/txt")
