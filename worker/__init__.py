"""Tuneboard GPU side: the job loop, the training recipe and inference."""

import os

# Before CUDA starts in any GPU process (training child, inference server): PyTorch's allocator
# grows its segments instead of caching fixed blocks, so a card filled close to its limit (a 24 GB
# card, or a memory-policy trial at the edge) does not fragment into out-of-memory retries. A value
# the operator set wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
