"""Generate text from a trained model: a run directory's checkpoint or an exported Hugging Face folder.

    python launch/generate.py runs/demo --prompt "The state of the Union is" --max-new-tokens 60
    python launch/generate.py runs/demo --tag step_00000300 --prompt "Fellow citizens" --temperature 0.8 --top-p 0.95
    python launch/generate.py exports/demo-hf --prompts-file prompts.txt --num-beams 4        # one prompt per line
    python launch/generate.py runs/demo --input prompts.jsonl --output out.jsonl --batch-size 16   # {"prompt": ...}

Greedy by default; --temperature > 0 samples (with --top-k, --top-p, --min-p, --repetition-penalty, --seed);
--num-beams > 1 is beam search. Prompts are batched (--batch-size, padded left or right) with a KV cache; each
stops at the end of a document, at a --stop string, after --max-new-tokens or when the model's context is full.
JSONL in -> JSONL out: each input object comes back with "completion", "finish" ("eod", "stop", "length",
"context"), "prompt_tokens" and "new_tokens" added (the output file is written whole, then renamed into place).
Without --output the continuations are printed. tokens/s (new tokens over the generation time) goes to stderr.
Runs on the accelerator DeepSpeed picks (one GPU, or the CPU); --device and --dtype override.
Exit status: 0 done; 2 bad input (a source, prompt file or setting; the message names it); 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pretrain` is the package, not a script

from pretrain.errors import BadInput, run_tool  # noqa: E402


class PromptError(BadInput, ValueError):
    """A prompt file that cannot be read as prompts; the message names the file and line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("source", help="a run directory (its newest valid checkpoint, or --tag) or an exported folder")
    p.add_argument("--tag", help="checkpoint tag, e.g. step_00000300")
    p.add_argument("--tokenizer", help="sentencepiece model (default: the run's data.tokenizer / the folder's)")
    src = p.add_argument_group("prompts (one of)")
    src.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    src.add_argument("--prompts-file", help="a UTF-8 text file, one prompt per line")
    src.add_argument("--input", help="JSONL, one object per line with the prompt in --field")
    p.add_argument("--field", default="prompt", help="JSONL field holding the prompt (default: prompt)")
    p.add_argument("--output", help="JSONL file to write the results to (default: print them)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="stop at this string (repeat for several)")
    g.add_argument("--no-stop-at-eod", dest="stop_at_eod", action="store_false", help="go on past a document's end")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--padding", choices=["left", "right"], default="left")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    g.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: the accelerator DeepSpeed picks)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: fp32 on CPU, bf16 on a GPU")
    return p


def read_prompts(args) -> tuple[list[str], list[dict] | None]:
    """The prompts, and the JSONL records they came from (None for other sources)."""
    given = [bool(args.prompt), bool(args.prompts_file), bool(args.input)]
    if sum(given) != 1:
        raise PromptError("give prompts with exactly one of --prompt, --prompts-file, --input")
    if args.prompt:
        return list(args.prompt), None
    path = Path(args.prompts_file or args.input)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"{path}: not UTF-8 text ({e})") from None
    lines = text.splitlines()
    if args.prompts_file:
        return lines, None
    records, prompts = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get(args.field), str):
            raise PromptError(f"{path}:{n}: expected an object with a string field {args.field!r}")
        records.append(record)
        prompts.append(record[args.field])
    return prompts, records


def run(args) -> int:
    from pretrain.fileutil import commit, tmp_name
    from pretrain.generate import GenerationSettings, generate
    from pretrain.inference import load_model

    prompts, records = read_prompts(args)
    if args.batch_size < 1:
        raise PromptError(f"--batch-size: {args.batch_size} must be at least 1")
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
        length_penalty=args.length_penalty, stop_at_eod=args.stop_at_eod, stop=tuple(args.stop), seed=args.seed,
        padding=args.padding,
    )  # fmt: skip
    settings.check()
    loaded = load_model(args.source, tag=args.tag, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype)
    tok = loaded.tokenizer
    results, new_tokens, seconds = [], 0, 0.0
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        t0 = time.perf_counter()
        seeds = [args.seed + start + i for i in range(len(batch))]  # a prompt samples alike in any batch
        ids = [[tok.bos_id, *p] if loaded.add_bos else p for p in tok.encode(batch)]  # as its documents began
        done = generate(
            loaded.model, ids, settings, vocab_size=tok.vocab_size, eod_id=tok.eod_id,
            decode=tok.decode, row_seeds=seeds,
        )  # fmt: skip
        seconds += time.perf_counter() - t0
        new_tokens += sum(len(c.ids) for c in done)
        for prompt, c in zip(batch, done):
            results.append(c)
            if args.output is None:
                print(f"{prompt}{c.text}" + ("" if c.finish == "eod" else f"  [{c.finish}]"), flush=True)
                print("---", flush=True)
    if args.output is not None:
        out = Path(args.output)
        lines = []
        for i, (prompt, c) in enumerate(zip(prompts, results)):
            record = dict(records[i]) if records is not None else {"prompt": prompt}
            record.update(completion=c.text, finish=c.finish, prompt_tokens=c.prompt_tokens, new_tokens=len(c.ids))
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_name(out).write_text("".join(lines), encoding="utf-8")
        commit(tmp_name(out), out)
    rate = new_tokens / seconds if seconds > 0 else 0.0
    print(
        f"{len(prompts)} prompt(s), {new_tokens} new tokens in {seconds:.2f} s: {rate:,.1f} tokens/s "
        f"({loaded.source}, {loaded.device}, batch {args.batch_size})" + (f" -> {args.output}" if args.output else ""),
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(run, args)


if __name__ == "__main__":
    sys.exit(main())
