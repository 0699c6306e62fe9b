"""Layer 5, integrations with the rest of the ecosystem: ``checkpoint`` (torch.distributed.checkpoint,
layout-independent), ``ddp`` (DistributedDataParallel: ``ep.data_parallel``) and ``deepspeed`` (the
DeepSpeed engine)."""
