"""Evaluate a checkpoint or an exported model: loss, perplexity and bits per byte on held-out text, as JSON.

    python launch/evaluate.py runs/demo --data out/demo                        # the dataset's val split
    python launch/evaluate.py runs/demo --tag step_00000300 --data out/demo --split train --max-tokens 100000
    python launch/evaluate.py export/demo --data held_out.jsonl --output result.json
    python launch/evaluate.py runs/demo --data out/demo/val/shard_00000 more_text/ --seq-len 256

SOURCE is a run directory (its newest valid checkpoint, or --tag) or an exported Hugging Face folder. --data takes
dataset directories (the --split of each; its manifest must name the model's tokenizer), shard prefixes and text
inputs (.txt, .jsonl, with .gz or .zst; files, folders, globs), read in the order given as one stream of documents:
an EOD, then each document's tokens and an EOD, cut into windows of --seq-len + 1 tokens overlapping by one, so
every token is predicted once with the context before it in its window.

The result (printed, and written atomically to --output): loss (nats per token), ppl, bpb (bits per UTF-8 byte of
the text the predicted tokens stand for: total nats / ln 2 / bytes), nats, tokens, bytes, documents (those whose
end was reached), and what was evaluated. The trainer's eval/loss, eval/ppl and eval/bpb come from the same code.
Exit status: 0 done; 2 bad input (a missing file, a dataset made with another tokenizer, an option out of range:
the message names it); 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pretrain` is the package, not a script


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("source", help="run directory (newest valid checkpoint, or --tag) or exported Hugging Face folder")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="dataset directories, shard prefixes, or .txt/.jsonl files, folders or globs")  # fmt: skip
    p.add_argument("--split", default="val", help="the split of dataset directories (default: val)")
    p.add_argument("--tag", help="checkpoint tag of a run directory (default: the newest valid one)")
    p.add_argument("--tokenizer", help="sentencepiece .model (default: the one the source names)")
    p.add_argument("--seq-len", type=positive, help="window length in tokens (default: the model's seq_len)")
    p.add_argument("--batch-size", type=positive, default=8, help="windows per forward pass (default: 8)")
    p.add_argument("--max-tokens", type=positive, help="predict at most this many tokens (default: all)")
    p.add_argument("--max-documents", type=positive, help="read at most this many documents (default: all)")
    p.add_argument("--text-field", default="text", help="the field of a .jsonl line that holds the text")
    p.add_argument("--device", help="torch device (default: a GPU if there is one, else the CPU)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="weights (default: fp32 on CPU, bf16 on a GPU)")
    p.add_argument("--output", help="also write the result to this JSON file")
    return p


def run(args) -> int:
    from pretrain.evaluate import EvalError, TokenBytes, evaluate, model_logits, source_windows
    from pretrain.fileutil import write_json_atomic
    from pretrain.inference import load_model

    loaded = load_model(args.source, tag=args.tag, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype)
    seq_len = args.seq_len or loaded.cfg.seq_len
    if seq_len > loaded.cfg.seq_len:
        raise EvalError(f"--seq-len: {seq_len} is longer than the model's seq_len of {loaded.cfg.seq_len}")
    t0 = time.perf_counter()
    batches = source_windows(
        args.data,
        loaded.tokenizer,
        seq_len=seq_len,
        batch_size=args.batch_size,
        split=args.split,
        text_field=args.text_field,
        max_tokens=args.max_tokens,
        max_documents=args.max_documents,
        add_bos=loaded.add_bos,
    )
    totals = evaluate(model_logits(loaded.model), TokenBytes(loaded.tokenizer), batches)
    if not totals.tokens:
        raise EvalError(f"--data: {' '.join(args.data)} holds no tokens to evaluate")
    seconds = time.perf_counter() - t0
    result = {
        **totals.as_dict(),
        "source": loaded.source,
        "data": args.data,
        "split": args.split,
        "tokenizer": str(loaded.tokenizer.path),
        "seq_len": seq_len,
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "max_tokens": args.max_tokens,
        "max_documents": args.max_documents,
        "seconds": round(seconds, 3),
    }
    print(json.dumps(result, indent=2))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pretrain.errors import run_tool

    return run_tool(run, args)


if __name__ == "__main__":
    sys.exit(main())
