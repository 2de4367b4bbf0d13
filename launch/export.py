"""Export a run's model to a Hugging Face Llama folder, or bring a Hugging Face Llama in for continued pretraining.

    python launch/export.py to-hf runs/demo --output export/demo [--tag step_00000300] [--dtype bfloat16]
        [--max-shard-size 5GB] [--tokenizer tok/sp.model] [--overwrite]
    python launch/export.py from-hf export/demo --output model.pt

`to-hf` reads the newest valid checkpoint of the run (or --tag), any ZeRO stage, and writes config.json,
model.safetensors (sharded past --max-shard-size, with model.safetensors.index.json), generation_config.json and
the tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model) from the run's
data.tokenizer or --tokenizer. The folder is written beside --output and renamed into place when complete; an
existing --output is refused unless --overwrite. It loads with transformers' AutoModelForCausalLM and AutoTokenizer.
`from-hf` reads a Llama folder (ours or another's, safetensors) and writes our consolidated fp32 state dict
(torch.save, loads with torch.load(weights_only=True)), then prints the model.* overrides that match it.
Exit status: 0 done; 1 an I/O error; 2 a run, checkpoint, folder or option that cannot be exported (the message
names it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pretrain` is the package, not a script


def _size():
    from pretrain.fileutil import parse_size

    return parse_size


def cmd_to_hf(args) -> int:
    from pretrain.export import ExportError, write_folder
    from pretrain.inference import documents_start_with_bos, read_checkpoint

    cfg, state, data, where = read_checkpoint(args.run, args.tag)
    tokenizer = args.tokenizer or data.get("tokenizer")
    if not tokenizer:
        raise ExportError(f"{where}/meta.json: the run names no data.tokenizer; pass --tokenizer")
    if not Path(tokenizer).is_file():
        raise ExportError(f"{tokenizer}: tokenizer not found (pass --tokenizer with the run's sentencepiece model)")
    add_bos = documents_start_with_bos(data)
    out = write_folder(
        state, cfg, tokenizer, args.output, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
        overwrite=args.overwrite, add_bos=add_bos,
    )  # fmt: skip
    n = sum(t.numel() for k, t in state.items() if not (cfg.tie_embeddings and k == "output.weight"))
    print(f"{where} -> {out}: LlamaForCausalLM, {n:,} parameters ({args.dtype}), tokenizer {tokenizer}")
    return 0


def cmd_from_hf(args) -> int:
    import torch

    from pretrain.export import config_overrides, read_folder
    from pretrain.fileutil import commit, tmp_name

    cfg, state, tokenizer = read_folder(args.folder)
    state = {k: t.float() for k, t in state.items()}  # our consolidated state dicts are fp32 (exact from bf16/fp16)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp_name(out))
    commit(tmp_name(out), out)
    n = sum(t.numel() for k, t in state.items() if not (cfg.tie_embeddings and k == "output.weight"))
    print(f"{args.folder} -> {out}: {len(state)} tensors, {n:,} parameters (fp32)")
    print("model config (launch/pretrain.py overrides):")
    print(" ".join(config_overrides(cfg)))
    print(f"start a run from these weights with: train.init_from={out}")
    if tokenizer is not None:
        print(f"tokenizer: {tokenizer} (data.tokenizer={tokenizer})")
    else:
        print("tokenizer: the folder has no tokenizer.model (a sentencepiece model is needed for data.tokenizer)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from pretrain.errors import run_tool

    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-hf", help="write a Hugging Face Llama folder from a run's checkpoint")
    to.add_argument("run", help="run directory (or its checkpoints/ directory)")
    to.add_argument("--output", required=True, help="the folder to write")
    to.add_argument("--tag", help="checkpoint tag (default: the newest valid one)")
    to.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="weights' dtype (default float32)"
    )
    to.add_argument(
        "--max-shard-size", type=_size(), default="5GB", help="largest weights file (default 5GB = 5e9 bytes)"
    )
    to.add_argument("--tokenizer", help="sentencepiece model (default: the run's data.tokenizer)")
    to.add_argument("--overwrite", action="store_true", help="replace an existing --output folder (once complete)")
    fr = sub.add_parser("from-hf", help="write our fp32 state dict from a Hugging Face Llama folder")
    fr.add_argument("folder", help="a Hugging Face Llama folder (config.json + safetensors)")
    fr.add_argument("--output", required=True, help="file to write (torch.save of the state dict)")
    args = p.parse_args(argv)
    commands = {"to-hf": cmd_to_hf, "from-hf": cmd_from_hf}
    return run_tool(commands[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
