"""`python -m data_prep <command>`: train-tokenizer, tokenize, inspect, merge (each has --help)."""

import sys

COMMANDS = {
    "train-tokenizer": "data_prep.train_tokenizer",
    "tokenize": "data_prep.tokenize_corpus",
    "inspect": "data_prep.inspect_shards",
    "merge": "data_prep.merge",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m data_prep {{{','.join(COMMANDS)}}} [--help | arguments]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
