# The phi2_xml recipe on one 80 GB GPU: python train.py config/phi2_xml_1gpu.py --init_from=/path/to/phi-2
#
# Memory, from the plan (python plan.py config/phi2_xml_1gpu.py --world_size=1 --gpu=h100), in GiB:
#   fp32 parameters 11.83, gradients 11.82, AdamW state 23.64, activations 19.48 (full AC's block inputs in
#   fp32, autocast's bf16 copies of the weights): peak 66.8 of the 71.6 usable on an 80 GB card.
#   Micro-batch 2 does not fit. AC by the plan's largest fitting micro-batch: per-op AC ("op") needs 124.7 GiB at
#   micro-batch 1 (the command with --activation_checkpointing=op), so full AC, micro-batch 1. A 141 GB H200
#   (--gpu=h200) holds op at micro-batch 1 (124.7 of 126.4 usable) and full up to micro-batch 5. Tokens/s and MFU
#   of full and op at T=32,768 on one GPU (bench.py --gpu-table, rows c): to be measured.
exec(open(__file__.replace("_1gpu", "")).read())  # the 8-GPU recipe, then these changes

batch_size = 1
grad_accum = 32                       # 1 x 32,768 x 32 = 1,048,576 tokens per step, as on 8 GPUs
out_dir = "out/phi2_xml_1gpu"
