# The canonical settings for the real benchmark on a CPU (README.md, "The paper's comparison at
# small scale"): python train_cl.py data/cl_benchmark_cpu.py --order=1 --method=all
# Every other key keeps train_cl.py's default. The learning rates were chosen on held-out
# training examples (--valid=True, order 1, seed 1337), never on test.json: see the README.
data_dir = "../shared/CL_Benchmark"
max_train = 500  # examples per task: a CPU runs every method on an order in about 6 minutes
max_test = 200
max_len = 128  # dbpedia's prompt (14 options) leaves about 50 tokens of its sentence
# the base: the small GPT pretrained on the other tasks of the folder (MNLI, RTE, SST-2 and yelp
# for orders 1 to 3), their examples written as prompt and answer, as an instruction-tuned model
# has read them: bare sentences did not teach a model this small to answer with an option
pretrain_answers = True
pretrain_iters = 600
pretrain_batch_size = 32
pretrain_negatives = 2048
