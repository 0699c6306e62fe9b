"""Tiny random models of the supported transformers MoE families, built from their config classes
(no downloads), shared by the tests of expert_parallel.hf."""

from __future__ import annotations

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "glm4_moe", "gpt_oss", "qwen3_next")
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, attn_implementation="eager")


def tiny_config(family: str):  # type: ignore[no-untyped-def]
    import transformers as tf
    if family == "mixtral":
        return tf.MixtralConfig(**COMMON, intermediate_size=48, num_key_value_heads=2, num_local_experts=8,
                                num_experts_per_tok=2)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=24,
                                 num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
                                 norm_topk_prob=True)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=24,
                                 num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                                 norm_topk_prob=False, shared_expert_intermediate_size=40)
    if family == "olmoe":
        return tf.OlmoeConfig(**COMMON, intermediate_size=24, num_key_value_heads=2, num_experts=8,
                              num_experts_per_tok=2, norm_topk_prob=False, eos_token_id=None,
                              pad_token_id=None)
    if family == "glm4_moe":  # DeepSeek-V3's routing, GLM's attention (partial rotary, qk norm)
        return tf.Glm4MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2,
                                n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                                routed_scaling_factor=2.5, use_qk_norm=True)
    if family == "gpt_oss":  # a limit the tiny model's pre-activations cross, so the clamp is tested
        return tf.GptOssConfig(**COMMON, intermediate_size=16, head_dim=8, num_key_value_heads=2,
                               num_local_experts=8, num_experts_per_tok=2, sliding_window=4,
                               layer_types=["sliding_attention", "full_attention"], swiglu_alpha=1.5,
                               swiglu_limit=1.0, rope_parameters=dict(rope_type="default", rope_theta=1e4))
    if family == "qwen3_next":  # one gated-DeltaNet layer (torch fallback kernels), one attention layer
        return tf.Qwen3NextConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                  shared_expert_intermediate_size=24, num_key_value_heads=2, head_dim=8,
                                  num_experts=8, num_experts_per_tok=2, linear_key_head_dim=8,
                                  linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                                  layer_types=["linear_attention", "full_attention"])
    return tf.DeepseekV3Config(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                               num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
                               topk_group=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                               q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8,
                               routed_scaling_factor=2.5)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A causal LM of the family with random weights (and random biases: DeepSeek's and GLM's expert
    bias, gpt-oss's router and expert biases)."""
    import transformers as tf
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight", "router.bias", "experts.gate_up_proj",
                              "experts.down_proj", "_proj_bias")):
                p.normal_(0, 0.3)  # routing and experts (and biases) far from uniform, so mistakes show
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape) * 0.1)
    return model.eval()
