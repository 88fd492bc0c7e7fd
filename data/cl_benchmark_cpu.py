# The canonical settings for the real benchmark on a CPU (README.md, "The real benchmark"):
#   python train_cl.py data/cl_benchmark_cpu.py --order=1 --method=all
# Every other key keeps train_cl.py's default; its learning rates were tuned on held-out
# training examples (--valid=True, order 1, seed 1337), never on test.json, and nothing beat them.
data_dir = "../shared/CL_Benchmark"
max_train = 500  # examples per task: every method over one order takes about 15 minutes of one core
max_test = 200
max_len = 128  # dbpedia's prompt, with its 14 options, keeps only the start of a long sentence
# the base: the small GPT pretrained on the other tasks of the folder (MNLI, RTE, SST-2 and yelp
# for orders 1 to 3), their examples written as prompt and answer, as an instruction-tuned model
# has read them: bare sentences did not teach a model this small to answer with an option
pretrain_answers = True
pretrain_iters = 600  # about 10 minutes on 2 cores, once: the base is cached in out_dir
pretrain_batch_size = 32
pretrain_negatives = 2048
