# Continued pre-training in the recipe ablation (python ablate.py): the base (config/ablate_base.py) taught XML, MDX,
# JavaScript and Markdown. Each arm of config/ablate_arms.py changes a few of these keys; all get the same budget.
exec(open(__file__.replace("ablate.py", "ablate_base.py")).read())  # the base's shapes and data, then these changes

out_dir = "out/ablate/arm"
init_from = "out/ablate/base/best"
mixture = {"xml": 0.3, "mdx": 0.2, "js": 0.3, "md": 0.2}  # the new languages only; replay arms add py and txt
max_iters = 400              # 819k tokens: every arm sees the same number, whatever it trains
eval_interval = 400          # step 0 (the base itself) and the end
learning_rate = 1e-3         # a third of the base's peak, as continued pre-training usually lowers it
min_lr = 1e-4
warmup_iters = 20
ckpt_interval = 400
log_interval = 50
