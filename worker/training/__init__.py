"""What every training method shares, one concern a module; a recipe (worker/recipes/) reads top
to bottom and calls these.

- `loading`: the base model (4-bit NF4 on CUDA), its tokenizer, Liger kernels, LoRA, fused MLPs.
- `memory_policy`: checkpointing, partial, offloaded or tiled, chosen by trial steps on the card.
- `distributed`: FSDP-QLoRA on several GPUs (arguments, the sharded adapter, agreed stops).
- `trainer`: the Trainer subclass and callback: metric rows, stop requests, the non-finite guard,
  atomic checkpoints.
- `recipe`: `LoRARecipe`, the life of one attempt (setup, train, save, cleanup) that a method's
  recipe fills in with its data, batches and loss.
"""
