# A tiny Phi on the synthetic XML/MDX/JS corpus: the whole pipeline on a laptop CPU in a few minutes.
# python train.py config/tiny.py
out_dir = "out/tiny"
data_dir = "data/tiny"
synthetic_docs = 3000        # 0.4M train tokens, 61 val docs; prepared into data_dir on first use (~10 s), no download
tokenizer_vocab = 2048
model_preset = "tiny"        # 4 layers, 128 wide
max_iters = 1500             # ~4.5 min on 2 cores; as valid as 2000 steps within noise (README); 1200: XML at the bar
eval_interval = 100
eval_iters = 4
ckpt_interval = 500
log_interval = 50
batch_size = 8
block_size = 256             # most synthetic documents fit whole, end and EOS included
learning_rate = 3e-3         # tiny models take a large LR
min_lr = 3e-4
warmup_iters = 50
dtype = "float32"            # CPUs gain nothing from bf16 autocast here
