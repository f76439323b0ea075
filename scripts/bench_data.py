"""Tokenization + collation throughput (examples/s) on the SST-2 and 20NG training sets.

    python scripts/bench_data.py [--data-dir ../shared/data] [--batch-size 32] [--repeat 3]

For each corpus and tokenizer (word vocabulary; MiniLM fast tokenizer, batched) it times:
encoding the whole training split (token ids, truncated), then one epoch of bucketed batches
through the padding collator; "total" is examples / (encode + collate) seconds. The word
vocabulary build is timed separately. Best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from qat.data.batching import BucketBatchSampler, Collator, EncodedDataset
from qat.data.encoding import HFEncoder, WordEncoder, minilm_path
from qat.data.glue import load_glue_split
from qat.data.newsgroups import load_20newsgroups
from qat.data.vocab import Vocab

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def best(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Fastest wall time of ``repeat`` calls, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def run(name: str, texts: list[str], labels: list[int], max_length: int, batch_size: int,
        repeat: int) -> None:
    n = len(texts)
    t_vocab, vocab = best(lambda: Vocab.build(texts, min_freq=1), repeat)
    print(f"\n{name}: {n:,} training examples, max_length={max_length}, batch_size={batch_size}")
    print(f"  word vocabulary build: {t_vocab:.2f} s ({n / t_vocab:,.0f} ex/s), "
          f"{len(vocab):,} tokens")
    encoders = {"word": WordEncoder(vocab, max_length),
                "minilm": HFEncoder(minilm_path(), max_length)}
    print(f"  {'tokenizer':<8} {'encode ex/s':>12} {'collate ex/s':>13} {'total ex/s':>11} "
          f"{'mean len':>9} {'pad %':>6}")
    for kind, enc in encoders.items():
        t_enc, feats = best(lambda enc=enc: enc(texts), repeat)
        ds = EncodedDataset(feats, labels, list(range(n)))
        collate = Collator(enc.pad_id)

        def epoch(ds: EncodedDataset = ds, collate: Collator = collate) -> tuple[int, int]:
            sampler = BucketBatchSampler.from_lengths(ds.lengths(), batch_size, seed=0)
            real = padded = 0
            for b in DataLoader(ds, batch_sampler=sampler, collate_fn=collate):
                real += int(b["attention_mask"].sum())
                padded += b["input_ids"].numel()
            return real, padded

        t_col, (real, padded) = best(epoch, repeat)
        print(f"  {kind:<8} {n / t_enc:>12,.0f} {n / t_col:>13,.0f} {n / (t_enc + t_col):>11,.0f}"
              f" {real / n:>9.1f} {100 * (1 - real / padded):>6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (collation)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sst = load_glue_split("sst2", "train", args.data_dir, download=False)
    run("SST-2", sst.texts_a, sst.labels, 128, args.batch_size, args.repeat)
    ng = load_20newsgroups(args.data_dir, "train", download=False)
    run("20 Newsgroups", ng.texts, ng.labels, 256, args.batch_size, args.repeat)


if __name__ == "__main__":
    main()
