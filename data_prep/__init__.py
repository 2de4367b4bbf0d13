"""Data preparation: tokenizer training, corpus tokenization into Megatron-format shards, shard inspection."""
