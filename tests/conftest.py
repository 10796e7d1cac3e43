import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Bit-identity comparisons need one thread count for every run in the session (reductions split differently
# across threads), and one thread is also steadier on these 2-core machines.
torch.set_num_threads(1)
