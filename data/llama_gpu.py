# The paper's LLaMA-2 protocol as its authors released it (method.md section 5), for one GPU:
#   python train_cl.py data/llama_gpu.py --init_from=path/to/Llama-2-7b-hf --order=1
# The folder's tokenizer.json (Llama-2's SentencePiece, or Llama 3.x's BPE) reads through Hugging
# Face's tokenizers library (pip install tokenizers); a Llama 3.x folder runs with the same file.
# This configuration has not been run on a GPU for this project: the memory it needs is the
# estimate train_cl.py prints at the start (README.md, "The paper's LLaMA setting on one GPU").
data_dir = "../shared/CL_Benchmark"  # O-LoRA's CL_Benchmark folder
max_train = 0  # the benchmark's full training data, as the paper trains
max_test = 0  # and its full test sets
max_len = 512  # the released scripts' source length plus answer
epochs = 1  # one pass over each task
batch_size = 64  # the global batch: 8 GPUs x 1 x 8 steps of accumulation in the paper
grad_accum = 16  # 64 = 16 micro-batches of 4 on one GPU; raise it (32, 64) where memory is short
eval_batch_size = 4  # the released scripts' evaluation batch
eval_tasks = "seen"  # the tasks trained so far: AA, BWT and forgetting need no more
# the method's places are the LLaMA family's defaults (train_cl.py FAMILY_PATTERNS): LoRA on
# self_attn q_proj and v_proj, GORP's full-rank weights mlp.gate_proj
lora_r = 8
lora_alpha = 32.0
lora_dropout = 0.1
rank = 8  # the projector's rank
update_proj_gap = 20  # T
scale = 0.25  # the projected update's alpha: the effective full-rank lr is 1e-6 * 0.25
lr = 2e-4  # LoRA, constant, no warm-up
full_rank_lr = 1e-6  # gate_proj
weight_decay = 0.0
# the baselines at the same LoRA rate, as the paper's tables compare them; a smaller GPU changes
# grad_accum and eval_batch_size only, which leave the results unchanged
inclora_lr = 2e-4
olora_lr = 2e-4
seqlora_lr = 2e-4
dtype = "bfloat16"  # autocast; frozen matrices held in bfloat16, trained ones and optimizer state in float32
