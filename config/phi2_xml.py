# Sheikh-2.5-Coder: phi-2 + 5 LLaMA-Pro blocks, continued pre-training on XML/MDX/JS at 32k context, 8 x 80 GB GPUs.
# torchrun --nproc_per_node=8 train.py config/phi2_xml.py --init_from=/path/to/phi-2 --data_dir=/path/to/prepared
#
# Memory per GPU, from the plan (python plan.py config/phi2_xml.py --world_size=8 --gpu=h100), in GiB:
#   parameters 2.12 (fp32 shards + one gathered bf16 block), optimizer state 2.96, collective buffers 0.15,
#   activations 23.13 (full AC: each block's input, 4 x 32,768 x 2,560 bf16, x 37 blocks, plus the block
#   being recomputed), temporaries 13.43 (that block's backward)
#   peak 41.8 of the 71.6 usable on an 80 GB H100 (10% kept for fragmentation, NCCL and the CUDA context).
# Micro-batch 4 with no accumulation: accumulating keeps FSDP's unsharded fp32 gradients between syncs
# (micro-batch 2 peaks at 23.7 GiB alone, 35.5 with grad_accum=2), and one micro-batch per step has the best MFU.
# AC policy and micro-batch by the plan's largest fitting micro-batch (the same command with
# --activation_checkpointing=X; --batch_size=1 --grad_accum=4 for the same tokens per step): full reaches 4, every
# sequence of the step, with no accumulation. Per-op AC ("op": the matmul and attention outputs kept) needs 267.4
# GiB at micro-batch 4 and 82.8 at 1 with grad_accum=4; none 402.4 at 4; selective (every 2nd block) 222 at 4.
# float8=tensorwise fits at 4: 53.5 GiB simulated, whose temporaries torchao's emulation overcounts (25.3 against
# 13.4 in bf16; plan.py's docstring). Speed of full against op at T=32,768 and of float8 (bench.py --gpu-table,
# rows b and c): to be measured.
# Two 8-GPU nodes, HSDP: --fsdp=hybrid --batch_size=2 (same tokens per step): peak 23.7 GiB per rank.
#
# Data: data/prepare.py with phi-2's tokenizer (README, "Data for a code model"): XML, MDX and JS, plus Python and
# English text to replay; decontaminated against HumanEval and our JS problems (prepare's default); the FIM
# sentinels take free rows of phi-2's 51,200 (its tokenizer has 50,295), so the embedding is not resized.
# The recipe ablation (python ablate.py; README "The recipe, chosen by measurement", BENCHMARKS.md) chose
# train_only_new_layers, the replay share, the FIM rate and the LR's ratio on a 1.8M-parameter base at CPU scale; each
# value below says what it measured, or why that scale cannot decide it.
out_dir = "out/phi2_xml"
data_dir = "data/xml_mdx_js"          # from data/prepare.py with phi-2's tokenizer
init_from = "checkpoints/phi-2"       # a local HF phi-2 directory; nothing is downloaded
model_preset = "phi-2"                # init_from's shape: plan.py uses it where the weights are not on this machine
# LLaMA-Pro (8 blocks on LLaMA-2-7B's 32): 32 -> 37 blocks, +393M params. The ablation cannot decide it: an inserted
# block, every weight trained, gained 0.6% on the new languages at 14-17% fewer tokens/s (arms c, e_c against a, d25)
expand_layers = 5
# measured: training only the inserted block (LLaMA-Pro, arm b) learned 40% as much (new-language loss 6.19 ->
# 4.86, against 2.77 with every weight), and replay kept retention as well (d25); the ablation's base never saw the
# new languages and its embeddings stay frozen in arm b, where phi-2's have seen code
train_only_new_layers = False
rope_scaling_factor = 16.0            # 2,048 -> 32,768 positions, linear RoPE scaling
block_size = 32768
batch_size = 4
grad_accum = 1                        # 4 x 32,768 x 8 ranks = 1,048,576 tokens per step
# 75% the new languages, 25% replay of phi-2's Python and English. Measured: 25% replay held the rise of the base's
# Python+English loss to 8.5% (10%: 14%; none: 33%) for 5% more loss on the new languages (arms d25, d10, a). The
# replay's own split is the ablation base's mixture (80% Python); phi-2's is not published, so it was not varied
mixture = {"xml": 0.31, "mdx": 0.13, "js": 0.31, "py": 0.20, "txt": 0.05}
fim_rate = 0.5                        # StarCoder's; measured: +1.2% left-to-right loss, no retention cost (e_c + fim)
fim_spm_rate = 0.5                    # StarCoder and Code Llama: half of the FIM documents in SPM order
train_tokens = 500e9                  # the seed's plan, and Code Llama's budget: 476,838 steps of 1,048,576 tokens
# measured as a ratio: a third of the base's peak LR beat a tenth (0.63 more learned, 0.10 more forgotten in the same
# tokens); phi-2's pre-training LR is not published, so the ratio gives no value and the seed's 1e-4 stays
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 1000
lr_schedule = "cosine"
weight_decay = 0.1
grad_clip = 1.0
dtype = "bfloat16"
compile = True
activation_checkpointing = "full"
fsdp = "full_shard"
eval_interval = 250
eval_iters = 4
ckpt_interval = 250
log_interval = 10
patience = 4
min_delta = 0.002
keep_last = 3
keep_best = 1
tensorboard = True
wandb_mode = "offline"
