# A search space for sweep.py: config keys and the distributions to draw them from.
# python sweep.py config/tiny.py --space=config/sweep_tiny.py --n_trials=20
learning_rate = loguniform(3e-4, 1e-2)
warmup_iters = intrange(0, 200, step=50)
weight_decay = uniform(0.0, 0.2)
mixture = choice([{}, {"xml": 0.4, "mdx": 0.3, "js": 0.3}, {"xml": 0.5, "mdx": 0.25, "js": 0.25}])
