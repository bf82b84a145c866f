# Sheikh-2.5-Coder: phi-2 + 5 LLaMA-Pro blocks, continued pre-training on XML/MDX/JS at 32k context, 8 x 80 GB GPUs.
# torchrun --nproc_per_node=8 train.py config/phi2_xml.py --init_from=/path/to/phi-2 --data_dir=/path/to/prepared
#
# Memory per GPU (3.17B params, full_shard over 8, micro-batch 2 x 32,768 tokens):
#   fp32 weights 12.7 GB + grads 12.7 GB + AdamW 25.4 GB = 50.8 GB, / 8 ranks      ->  6.4 GB
#   full activation checkpointing keeps only each block's input:
#     2 x 32,768 x 2,560 x 2 bytes = 0.34 GB per block x 37 blocks                 -> 12.4 GB
#   one block recomputed in backward (q,k,v, attention out, fc1 + gelu at 4x width) -> ~6 GB
#   chunked loss: never the 2 x 32,768 x 51,200 fp32 logits (13 GB), one chunk      -> ~1 GB
#   two gathered bf16 blocks (prefetch) + allocator slack                          -> ~5 GB
#   total ~31 GB: micro-batch 4 would reach ~50 GB plus fragmentation; 2 leaves headroom for 80 GB cards.
#   selective AC would store ~4 GB of activations per unchecked block: it does not fit at 32k.
out_dir = "out/phi2_xml"
data_dir = "data/xml_mdx_js"          # from data/prepare.py with phi-2's tokenizer
init_from = "checkpoints/phi-2"       # a local HF phi-2 directory; nothing is downloaded
expand_layers = 5                     # 32 -> 37 blocks, +393M params
train_only_new_layers = False
rope_scaling_factor = 16.0            # 2,048 -> 32,768 positions, linear RoPE scaling
block_size = 32768
batch_size = 2
grad_accum = 2                        # 2 x 32,768 x 2 x 8 ranks = 1,048,576 tokens per step
mixture = {"xml": 0.4, "mdx": 0.2, "js": 0.4}
max_iters = 10000
learning_rate = 1e-4                  # the seed's LR: gentle enough to keep phi-2's general coding skill
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
