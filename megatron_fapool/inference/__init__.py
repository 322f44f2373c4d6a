"""Inference: KV-cached prefill and decode through Megatron GPTModel, with a pool-resident KV cache."""
