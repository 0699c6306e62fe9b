"""``job_end.py END OUT_DIR``: a user's script, written at module level as scripts are (its model and
groups stay referenced until interpreter teardown), that ends in one of two ways: ``shutdown``
(``ep.shutdown(ctx)``) or ``destroy`` (``torch.distributed.destroy_process_group()``, what torch's
docs advise). It is the docs' Hugging Face example: a tiny Qwen3-MoE made expert-parallel, one
backward, saved for transformers and loaded back. It registers an atexit handler, which must run
either way, and prints a line after the end call (``ep.shutdown`` does not return in a launched
process)."""

import atexit
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

import expert_parallel as ep

end, out = sys.argv[1], sys.argv[2]
ctx = ep.init_distributed()
torch.manual_seed(0)
config = Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        num_experts=8, num_experts_per_tok=2)
model = ep.hf.expert_parallelize(AutoModelForCausalLM.from_config(config), ctx)
input_ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(ctx.rank))
model(input_ids, labels=input_ids, output_router_logits=True).loss.backward()
ep.sync_gradients(model, ctx)
ep.hf.save_pretrained(model, out, ctx)
model = ep.hf.from_pretrained(out, ctx)
atexit.register(lambda: print(f"rank {ctx.rank}: atexit handler ran", flush=True))
print(f"rank {ctx.rank}: trained, saved and loaded", flush=True)
if end == "shutdown":
    ep.shutdown(ctx)
else:
    dist.destroy_process_group()
print(f"rank {ctx.rank}: returned from {end}", flush=True)
