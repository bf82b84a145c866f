# The second stage of the recipe ablation (python ablate.py): the best arm of config/ablate_arms.py, passed as
# flags, once with fill-in-the-middle on (StarCoder's rate) and once with a third of the LR; the same seeds.
exec(open(__file__.replace("ablate_best", "ablate_arms")).read())  # the seeds and the objectives
arm = variants(fim=dict(fim_rate=0.5), low_lr=dict(learning_rate=3e-4, min_lr=3e-5))
