# The base model of the recipe ablation (python ablate.py): a tiny Phi trained from scratch on real Python and
# English that the install puts on disk; it stands in for phi-2. ablate.py prepares data_dir and passes it.
out_dir = "out/ablate/base"
data_dir = "out/ablate/data"
model_preset = "tiny"        # 4 blocks, 128 wide: 1.3M parameters with the 4,096-token BPE
mixture = {"py": 0.8, "txt": 0.2}  # phi-2's strengths; the new languages' val sets are watched, never trained
max_iters = 2000
eval_interval = 500
eval_iters = 4
eval_domain_prompts = 16     # + Python validity of greedy function bodies: 8 of ours, up to 16 held-out headers
ckpt_interval = 1000
log_interval = 100
batch_size = 8
block_size = 256
learning_rate = 3e-3         # tiny models take a large LR (config/tiny.py)
min_lr = 3e-4
warmup_iters = 50
dtype = "float32"
patience = 0                 # a fixed budget, as a pre-training run
