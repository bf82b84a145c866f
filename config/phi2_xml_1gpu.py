# The phi2_xml recipe on one 80 GB GPU: python train.py config/phi2_xml_1gpu.py --init_from=/path/to/phi-2
#
# Memory (3.17B params, one process, nothing sharded, micro-batch 1 x 32,768 tokens):
#   fp32 weights 12.7 GB + grads 12.7 GB + AdamW 25.4 GB                 -> 50.8 GB
#   full AC: block inputs 1 x 32,768 x 2,560 x 2 bytes x 37 blocks      ->  6.2 GB
#   one block recomputed in backward + one loss chunk                    -> ~4 GB
#   bf16 autocast copies of one block's weights, allocator slack         -> ~4 GB
#   total ~65 GB of 80; micro-batch 2 would not leave enough room.
exec(open(__file__.replace("_1gpu", "")).read())  # the 8-GPU recipe, then these changes

batch_size = 1
grad_accum = 32                       # 1 x 32,768 x 32 = 1,048,576 tokens per step, as on 8 GPUs
out_dir = "out/phi2_xml_1gpu"
