"""Feature-building time and peak RSS at growing post counts, extrapolated to SMPD (486,194 posts).

    python benchmarks/feature_scale.py [--sizes 50000,200000] [--sentence-sample 2000]

Each size runs in a fresh process (synthetic posts from datamodules.synthetic.make_posts, no images). The
sentence encoder (MiniLM) dominates at scale and is linear in posts, so it is measured separately on a sample
(sentences/s) and added to the extrapolation; the other families run in full at every size.
Target: the 486k build under 8 GB peak RSS and under 15 min on 2 cores.
"""

from __future__ import annotations

import argparse

from common import measure, print_table, write_results

SMPD_POSTS = 486_194


def build(n: int) -> dict:
    import numpy as np

    from datamodules.folds import assign_folds
    from datamodules.synthetic import make_posts
    from features.build import build_features
    from features.config import FeatureConfig

    posts, _, _ = make_posts(int(n * 0.63), n - int(n * 0.63), 0)
    folds = assign_folds(posts.label.to_numpy(), 5, 0)
    fs = build_features(posts, folds, FeatureConfig(sentence_model=""))
    return {"posts": n, "columns": len(fs.families), **{f"s_{k}": v for k, v in fs.seconds.items()}}


def sentence_rate(n: int) -> dict:
    import time

    import torch

    from datamodules.synthetic import make_posts
    from features.sentence import SentenceEncoder, post_sentences, resolve_model_dir

    torch.set_num_threads(2)
    posts, _, _ = make_posts(n, 0, 0)
    enc = SentenceEncoder(resolve_model_dir("minilm"), max_length=64, batch_size=256)
    texts = post_sentences(posts)
    start = time.perf_counter()
    enc.encode(texts)
    return {"sentences": n, "sentences_per_s": round(n / (time.perf_counter() - start), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="50000,200000")
    p.add_argument("--sentence-sample", type=int, default=2000)
    a = p.parse_args()
    rows = [measure(build, int(n)) for n in a.sizes.split(",")]
    print_table(rows, "feature families without the sentence encoder (fresh process per size)")
    sent = measure(sentence_rate, a.sentence_sample)
    print_table([sent], "sentence encoder (MiniLM, 2 threads)")
    big = rows[-1]
    per_post = big["seconds"] / big["posts"]
    rss_per_post = big["peak_rss_gb"] / big["posts"]
    est = {
        "posts": SMPD_POSTS,
        "seconds_without_sentence": round(per_post * SMPD_POSTS, 1),
        "seconds_sentence": round(SMPD_POSTS / sent["sentences_per_s"], 1),
        "peak_rss_gb_linear": round(rss_per_post * SMPD_POSTS, 2),
    }
    est["seconds_total"] = round(est["seconds_without_sentence"] + est["seconds_sentence"], 1)
    print_table([est], "linear extrapolation to SMPD (486,194 posts); target < 900 s and < 8 GB")
    write_results("feature_scale", {"sizes": rows, "sentence": sent, "smpd_estimate": est})


if __name__ == "__main__":
    main()
