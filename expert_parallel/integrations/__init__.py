"""Layer 5, integrations with the rest of the ecosystem: ``checkpoint`` (torch.distributed.checkpoint,
layout-independent) and ``deepspeed`` (the DeepSpeed engine)."""
