"""Install with `pip install -e .[dev]`; on a CPU-only machine install `torch==2.13.0` first (see README)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

__version__ = re.search(r'__version__ = "(.+)"', Path("pretrain/__init__.py").read_text()).group(1)

setup(
    name="pretrain",
    version=__version__,
    description="Pretrain GPT-style language models with DeepSpeed: from raw text to token shards to a trained model.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pretrain", "pretrain.*", "data_prep", "data_prep.*"]),
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "numpy>=1.24",
        "sentencepiece>=0.2",
        "tensorboard>=2.14",
        "zstandard>=0.22",
        "tqdm>=4.66",
        "psutil>=5.9",
        "pyyaml>=6",
        "safetensors>=0.4",
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.6", "megatron-core==0.16.1"],
        "hf": ["transformers>=4.45"],  # launch/export.py's folders load with 4.45.2 and 5.24 (tests use it)
    },
    entry_points={
        "console_scripts": [
            "pretrain-data=data_prep.__main__:main",
        ]
    },
)
