"""Feature-building time and peak RSS at growing post counts, extrapolated to SMPD (486,194 posts).

    python benchmarks/feature_scale.py [--sizes 50000,200000] [--sentence-sample 4000]

Each size runs in a fresh process (synthetic posts from datamodules.synthetic.make_posts, no images); pass
``--sizes ...,486194`` to measure SMPD's size directly instead of extrapolating. The sentence encoder (MiniLM)
dominates at scale and is linear in distinct texts, so it is measured separately on a sample (distinct texts/s, for the
synthetic posts' short texts and for Flickr-shaped texts of 0-8 title words + 0-25 tags) and added to the
estimate; the other families run in full at every size.
Target: the 486k build under 8 GB peak RSS and under 15 min on 2 cores.
"""

from __future__ import annotations

import argparse

from common import measure, print_table, write_results

SMPD_POSTS = 486_194


def build(n: int) -> dict:
    from popstack.datamodules.folds import assign_folds
    from popstack.datamodules.synthetic import make_posts
    from popstack.features.build import build_features
    from popstack.features.config import FeatureConfig

    posts, _, _ = make_posts(int(n * 0.63), n - int(n * 0.63), 0)
    folds = assign_folds(posts.label.to_numpy(), 5, 0)
    fs = build_features(posts, folds, FeatureConfig(sentence_model=""))
    return {"posts": n, "columns": len(fs.families), **{f"s_{k}": v for k, v in fs.seconds.items()}}


def flickr_like_texts(n: int, vocab: list[str], seed: int = 0) -> list[str]:
    """Title + tags strings shaped like Flickr posts: 0-8 title words and 0-25 tags, English whole words."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocab, rng.integers(0, 9))) + " " + " ".join(rng.choice(vocab, rng.integers(0, 26)))
            for _ in range(n)]


def sentence_rate(n: int, batch_size: int) -> list[dict]:
    """Distinct texts/s of the MiniLM encoder on 2 threads for the synthetic posts' texts and for Flickr-like texts."""
    import time

    import numpy as np
    import torch

    from popstack.datamodules.synthetic import make_posts
    from popstack.features.sentence import SentenceEncoder, post_sentences, resolve_model_dir

    torch.set_num_threads(2)
    posts, _, _ = make_posts(n, 0, 0)
    enc = SentenceEncoder(resolve_model_dir("minilm"), max_length=64, batch_size=batch_size)
    vocab = sorted(w for w in enc.tokenizer.get_vocab() if w.isascii() and w.isalpha() and len(w) > 2)
    rows = []
    for name, texts in (("synthetic posts", post_sentences(posts)), ("flickr-like", flickr_like_texts(n, vocab))):
        tokens = [len(t) for t in enc.tokenizer(texts, truncation=True, max_length=64)["input_ids"]]
        enc.encode(texts)  # warm-up pass: the first batch of each (batch, length) shape pays for kernel setup
        start = time.perf_counter()
        enc.encode(texts)
        sec = time.perf_counter() - start
        distinct = len(set(texts))
        rows.append({"texts": name, "n": n, "mean_tokens": round(float(np.mean(tokens)), 1),
                     "distinct_fraction": round(distinct / n, 3), "distinct_texts_per_s": round(distinct / sec, 1)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="50000,200000")
    p.add_argument("--sentence-sample", type=int, default=4000)
    p.add_argument("--sentence-batch-size", type=int, default=128)
    a = p.parse_args()
    rows = [measure(build, int(n)) for n in a.sizes.split(",")]
    print_table(rows, "feature families without the sentence encoder (fresh process per size)")
    sent = measure(lambda: {"rates": sentence_rate(a.sentence_sample, a.sentence_batch_size)})["rates"]
    print_table(sent, f"sentence encoder (MiniLM, 2 threads, batch {a.sentence_batch_size}, max 64 tokens); "
                      "each distinct text is encoded once")
    big = rows[-1]
    per_post = big["seconds"] / big["posts"]
    rss_per_post = big["peak_rss_gb"] / big["posts"]
    base = round(per_post * SMPD_POSTS, 1) if big["posts"] != SMPD_POSTS else big["seconds"]
    est = []
    for r in sent:
        row = {"posts": SMPD_POSTS, "sentence_texts": r["texts"], "seconds_without_sentence": base,
               "seconds_sentence_no_duplicates": round(SMPD_POSTS / r["distinct_texts_per_s"], 1),
               "peak_rss_gb": round(rss_per_post * SMPD_POSTS, 2)}
        row["seconds_total"] = round(row["seconds_without_sentence"] + row["seconds_sentence_no_duplicates"], 1)
        row["distinct_fraction_for_900s"] = round(max(0.0, 900 - base) / row["seconds_sentence_no_duplicates"], 3)
        est.append(row)
    print_table(est, "extrapolation to SMPD (486,194 posts, linear; every text distinct); target < 900 s and < 8 GB")
    print("distinct_fraction_for_900s: the share of distinct title+tags texts under which the whole build meets 900 s")
    write_results("feature_scale", {"sizes": rows, "sentence": sent, "smpd_estimate": est})


if __name__ == "__main__":
    main()
