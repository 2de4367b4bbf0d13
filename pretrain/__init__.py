"""pretrain: pretraining GPT-style language models with DeepSpeed, from raw text to an exportable model.

Importing the package is cheap: it pulls in neither torch nor DeepSpeed, so data preparation workers can use
`pretrain.shards` and `pretrain.tokenizer` without loading them.
"""

__version__ = "0.1.0"
