"""Generation speed: our KV-cache `generate` against transformers' `generate` on the same exported model.

    .venv/bin/python bench/generate.py              # the 125m model, batch 1 and 8; about 4 minutes on 2 cores
    .venv/bin/python bench/generate.py --quick      # a tiny model, a few seconds: a smoke test of the script
    .venv/bin/python bench/generate.py --d-model 512 --n-layers 8 --n-heads 8 --batch-sizes 1,4,8

One process, fp32 on CPU, the same torch threads (--threads) for both. The model has the shape of
launch/configs/125m.yaml (or --model tiny, or the --d-model / --n-layers / --n-heads overrides), random weights
from `init_weights(--seed)` (speed does not need a trained model) with init_std --init-std (default 0.1: at the
training init, 0.02, the tied-embedding model greedily repeats each prompt's last token forever, which would make
the token-for-token check below vacuous; the weights' values do not change the work done), and the vocabulary of a sentencepiece
tokenizer (--vocab-size, default 32000) trained in a temporary folder on the State of the Union speeches (`sotu`,
shipped in a registry package). The model is exported with `pretrain.export.write_folder` and loaded back with
`LlamaForCausalLM.from_pretrained(folder, local_files_only=True)`, so transformers runs exactly what a user of
the export gets (its default attention implementation, printed).

Prompts: the first --prompt-tokens (default 64) tokens of the first `batch` speeches, so every row has the same
length (no padding; HF gets an all-ones attention_mask). Each side generates --new-tokens (default 128) greedy
tokens with no early stop: ours with `GenerationSettings(max_new_tokens=N, stop_at_eod=False)`, transformers
with do_sample=False, num_beams=1, max_new_tokens = min_new_tokens = N, eos_token_id=None (no stop, no
end-of-document suppression), pad_token_id set, use_cache=True. The timed call is the whole `generate`
(prompt prefill included) for both. Each side is warmed up once per batch size (a short generate), then the two
are interleaved --repeats times (alternating which goes first); the best time of each is kept.
tokens/s = batch x new tokens / seconds.

Correctness, in the same run: the greedy tokens must be identical token for token between the two (a mismatch
is printed loudly, with the logit gap of the two candidates at the first differing token: a gap near 0 is a
numerical near-tie, anything else means the export or the generation is wrong), and the prompt logits of the
two models are compared (max |ours - HF|). Target: ours >= transformers in tokens/s at every batch size.
The exit status is 1 when outputs differ, else 0 whatever the speed verdict (it is a report).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local: never ask the Hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import torch  # noqa: E402
from machine import cpu_model  # noqa: E402  (bench/ is on the path when run as a script)

from data_prep.corpora import sotu_dir  # noqa: E402
from pretrain.config import ModelConfig, load_config  # noqa: E402
from pretrain.generate import GenerationSettings, generate  # noqa: E402
from pretrain.model import Transformer  # noqa: E402
from pretrain.tokenizer import Tokenizer  # noqa: E402

GIB = 2**30
CONFIG_125M = REPO / "launch" / "configs" / "125m.yaml"
TINY = ModelConfig(d_model=128, n_layers=2, n_heads=4, seq_len=512, tie_embeddings=True)
WARMUP_TOKENS = 8  # new tokens of the warm-up call of each side
NEAR_TIE = 1e-4  # a logit gap below this at the first differing token: numerical noise, not a wrong model


# ----------------------------------------------------------------------------------------------- setup
def model_config(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    base = TINY if args.model == "tiny" else load_config(CONFIG_125M).model
    changes = {"vocab_size": vocab_size, "init_std": args.init_std}
    for field in ("d_model", "n_layers", "n_heads"):
        if getattr(args, field) is not None:
            changes[field] = getattr(args, field)
    needed = args.prompt_tokens + args.new_tokens
    if base.seq_len < needed:
        changes["seq_len"] = needed
    return dataclasses.replace(base, **changes)


def train_tokenizer(work: Path, vocab_size: int) -> Tokenizer:
    from data_prep.train_tokenizer import TokenizerSettings, train

    prefix = work / "sp"
    train(TokenizerSettings(inputs=[str(sotu_dir())], output=prefix, vocab_size=vocab_size, quiet=True))
    return Tokenizer(prefix.with_name("sp.model"))


def make_prompts(tok: Tokenizer, batch: int, length: int) -> list[list[int]]:
    """The first `length` tokens of each of the first `batch` speeches (with at least that many tokens)."""
    prompts = []
    for path in sorted(sotu_dir().glob("*.txt")):
        ids = tok.encode(path.read_text(encoding="utf-8"))
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == batch:
            return prompts
    raise SystemExit(f"error: fewer than {batch} speeches with {length} tokens")


def load_hf(folder: Path):
    import transformers
    from transformers import LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return LlamaForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------------------------- the two sides
def run_ours(model: Transformer, prompts, new_tokens: int, tok: Tokenizer) -> tuple[float, list[list[int]]]:
    settings = GenerationSettings(max_new_tokens=new_tokens, stop_at_eod=False)
    t0 = time.perf_counter()
    done = generate(model, prompts, settings, vocab_size=tok.vocab_size, eod_id=tok.eod_id)
    seconds = time.perf_counter() - t0
    return seconds, [c.ids for c in done]


def run_hf(hf, prompts, new_tokens: int, tok: Tokenizer) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    t0 = time.perf_counter()
    out = hf.generate(
        ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        num_beams=1, eos_token_id=None, pad_token_id=tok.pad_id if tok.pad_id >= 0 else 0, use_cache=True,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    return seconds, out[:, ids.shape[1] :].tolist()


SIDES = {"ours": run_ours, "transformers": run_hf}


@dataclasses.dataclass
class Row:
    batch: int
    seconds: dict[str, float]  # best over repeats, per side
    outputs: dict[str, list[list[int]]]
    mismatch: str | None = None  # where the greedy outputs first differ, and the logit gap there

    def tokens_per_s(self, side: str, new_tokens: int) -> float:
        return self.batch * new_tokens / self.seconds[side]


def first_difference(a: list[list[int]], b: list[list[int]]) -> tuple[int, int] | None:
    for i, (x, y) in enumerate(zip(a, b)):
        for j, (s, t) in enumerate(zip(x, y)):
            if s != t:
                return i, j
        if len(x) != len(y):
            return i, min(len(x), len(y))
    return None


def explain_mismatch(model: Transformer, prompts, row: Row) -> str:
    """Where ours and HF first differ, and our model's logit gap there between the two choices."""
    i, j = first_difference(row.outputs["ours"], row.outputs["transformers"])
    ours, hf = row.outputs["ours"][i], row.outputs["transformers"][i]
    where = f"row {i}, new token {j}"
    if j >= min(len(ours), len(hf)):
        return f"{where}: lengths {len(ours)} (ours) vs {len(hf)} (transformers)"
    with torch.no_grad():
        logits = model(torch.tensor([prompts[i] + ours[:j]]))[0, -1].float()
    gap = abs(float(logits[ours[j]] - logits[hf[j]]))
    kind = "a numerical near-tie" if gap < NEAR_TIE else "NOT a near-tie: the export or generation is wrong"
    return f"{where}: ours {ours[j]}, transformers {hf[j]}; our logit gap {gap:.2e} ({kind})"


def prompt_logit_diff(model: Transformer, hf, prompts) -> float:
    ids = torch.tensor(prompts)
    with torch.no_grad():
        ours = model(ids)[..., : hf.config.vocab_size].float()
        theirs = hf(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
    return float((ours - theirs).abs().max())


def measure(model, hf, prompts, args, tok: Tokenizer) -> Row:
    engines = {"ours": model, "transformers": hf}
    for side, fn in SIDES.items():
        fn(engines[side], prompts, min(WARMUP_TOKENS, args.new_tokens), tok)
    best = dict.fromkeys(SIDES, float("inf"))
    outputs: dict[str, list[list[int]]] = {}
    for r in range(args.repeats):
        order = list(SIDES) if r % 2 == 0 else list(SIDES)[::-1]
        for side in order:
            seconds, out = SIDES[side](engines[side], prompts, args.new_tokens, tok)
            best[side] = min(best[side], seconds)
            if side in outputs and outputs[side] != out:
                print(f"warning: {side} gave different tokens in repeat {r + 1} (not deterministic)", flush=True)
            outputs.setdefault(side, out)
            tps = len(prompts) * args.new_tokens / seconds
            print(f"batch {len(prompts)}, repeat {r + 1}/{args.repeats}: {side}: {seconds:.2f} s, {tps:.1f} tokens/s")
    row = Row(len(prompts), best, outputs)
    if first_difference(outputs["ours"], outputs["transformers"]) is not None:
        row.mismatch = explain_mismatch(model, prompts, row)
    return row


# ----------------------------------------------------------------------------------------------- report
def machine_lines(args: argparse.Namespace, hf) -> list[str]:
    import transformers

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"nproc: {len(os.sched_getaffinity(0))}, CPU: {cpu_model()}, RAM: {psutil.virtual_memory().total / GIB:.1f} GiB",
        f"load average (1, 5, 15 min) at the end: {load}",
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"torch threads: {args.threads} (both sides); transformers attention: {hf.config._attn_implementation}",
    ]


def table(rows: list[Row], args: argparse.Namespace) -> str:
    n = args.new_tokens
    head = ["batch", "prompt", "new", "ours s", "ours tok/s", "HF s", "HF tok/s", "ours / HF", "greedy tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * (len(head) - 1) + ["---"]) + "|"]
    for r in rows:
        cells = [
            str(r.batch),
            str(args.prompt_tokens),
            str(n),
            f"{r.seconds['ours']:.2f}",
            f"{r.tokens_per_s('ours', n):.1f}",
            f"{r.seconds['transformers']:.2f}",
            f"{r.tokens_per_s('transformers', n):.1f}",
            f"{r.seconds['transformers'] / r.seconds['ours']:.2f}x",
            "identical" if r.mismatch is None else "DIFFER",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> list[str]:
    lines = []
    for r in rows:
        ratio = r.seconds["transformers"] / r.seconds["ours"]
        verdict = "PASS" if ratio >= 1.0 else "FAIL"
        lines.append(f"{verdict}  ours >= transformers at batch {r.batch}: {ratio:.2f}x")
    return lines


# ----------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["125m", "tiny"], default="125m", help="model shape (default: 125m)")
    p.add_argument("--d-model", type=int, help="override the shape's d_model")
    p.add_argument("--n-layers", type=int, help="override the shape's n_layers")
    p.add_argument("--n-heads", type=int, help="override the shape's n_heads")
    p.add_argument("--vocab-size", type=int, default=32000, help="tokenizer vocabulary (default: 32000)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated (default: 1,8)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="tokens in every prompt (default: 64)")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated per row (default: 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each side; the best is kept (default: 3)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="of init_weights (default: 0)")
    p.add_argument("--init-std", type=float, default=0.1, help="std of the random weights (default: 0.1; see above)")
    p.add_argument("--quick", action="store_true", help="tiny model, vocab 1000, 16 new tokens, 1 repeat")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (tokenizer, export)")
    return p


def run(args: argparse.Namespace, work: Path) -> int:
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"training a tokenizer (vocab {args.vocab_size}) on the State of the Union speeches ...", flush=True)
    tok = train_tokenizer(work, args.vocab_size)
    cfg = model_config(args, tok.vocab_size)
    model = Transformer(cfg)
    model.init_weights(args.seed)
    model.eval()
    print(f"model: {dataclasses.asdict(cfg)}", flush=True)
    print(f"parameters: {model.num_params() / 1e6:.1f} M; exporting and loading with transformers ...", flush=True)
    from pretrain.export import write_folder

    folder = write_folder(model.state_dict(), cfg, tok.path, work / "hf", dtype="float32")
    hf = load_hf(folder)
    all_prompts = make_prompts(tok, max(batch_sizes), args.prompt_tokens)
    logit_diff = prompt_logit_diff(model, hf, all_prompts)
    rows = [measure(model, hf, all_prompts[:b], args, tok) for b in batch_sizes]
    print()
    print("\n".join(machine_lines(args, hf)))
    print(f"model: d_model {cfg.d_model}, n_layers {cfg.n_layers}, n_heads {cfg.n_heads}, vocab {tok.vocab_size}, ")
    print(
        f"  {model.num_params() / 1e6:.1f} M parameters (tied embeddings: {cfg.tie_embeddings}), fp32, "
        f"init_weights(seed {args.seed}) with init_std {cfg.init_std}"
    )
    print(f"prompts: the first {args.prompt_tokens} tokens of State of the Union speeches (no padding)")
    print(f"repeats: {args.repeats} (best time shown; whole generate call, prefill included)")
    print()
    print(table(rows, args))
    print()
    print(f"prompt logits, batch {len(all_prompts)} x {args.prompt_tokens}: max |ours - HF| = {logit_diff:.2e}")
    distinct = {t for r in rows for row in r.outputs["ours"] for t in row}
    print(f"distinct generated tokens (ours, all batches): {len(distinct)}")
    for r in rows:
        if r.mismatch:
            print(f"!!! MISMATCH at batch {r.batch}: greedy outputs differ at {r.mismatch}")
    print("\n".join(verdicts(rows)))
    print(f"\nbench took {time.perf_counter() - t_start:.0f} s")
    return 1 if any(r.mismatch for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.model, args.vocab_size, args.new_tokens, args.repeats = "tiny", 1000, 16, 1
    if min(args.repeats, args.new_tokens, args.prompt_tokens, args.threads) < 1:
        print("error: --repeats, --new-tokens, --prompt-tokens and --threads must be at least 1", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    try:
        return run(args, work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
