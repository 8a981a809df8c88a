"""Speed paths that must not change results: cut prompts, reused prompt embeddings, per-batch cache gathers,
shared feature matrices, member thread/device settings."""

from __future__ import annotations

import torch

from popstack.lightning_modules.backbone import encode_text_embeddings, load_backbone
from popstack.lightning_modules.prompt_learner import DualGrainedPromptLearner

CLASSES = ["dogs", "street art", "food, drink", "sunset over the sea"]


def _learner(n_ctx: int = 4) -> DualGrainedPromptLearner:
    torch.manual_seed(0)
    bb = load_backbone("popstack-tiny-clip")
    bb.model.requires_grad_(False)
    return DualGrainedPromptLearner(bb.model, bb.tokenizer, CLASSES, n_ctx=n_ctx)


def test_cut_prompts_match_full_context_length():
    learner = _learner()
    assert learner.n_positions < learner.token_ids.shape[1]
    model = learner._clip[0]
    full = {}
    for name, ctx in (("g", learner.ctx_global), ("l", learner.ctx_local)):
        k = learner.prefix.shape[0]
        prompts = torch.cat([learner.prefix, ctx.unsqueeze(0).expand(k, -1, -1), learner.suffix], dim=1)
        full[name], _ = encode_text_embeddings(model, prompts, learner.token_ids)
    glob, loc = learner()
    torch.testing.assert_close(glob, full["g"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loc, full["l"], atol=1e-5, rtol=1e-5)


def test_prompt_embeddings_reused_until_the_contexts_change():
    learner = _learner()
    calls = []
    tower = learner._clip[0].transformer
    tower.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        g1, _ = learner()
        g2, _ = learner()
        assert len(calls) == 1 and g2 is g1  # validation/predict: encoded once
        learner.ctx_global.add_(0.5)  # an optimiser step changes the contexts in place
        g3, _ = learner()
    assert len(calls) == 2 and not torch.allclose(g3, g1)
    g4, _ = learner()  # training (autograd on): always recomputed, with a graph to the contexts
    assert len(calls) == 3 and g4.requires_grad


def _tiny_cache(tmp_path, n: int = 40, d: int = 8, length: int = 5):
    """An embedding cache + posts/folds/vocab of ``n`` posts (every 4th unlabelled) in ``tmp_path``."""
    import json

    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    cache = tmp_path / "embeddings"
    cache.mkdir()
    ids = [f"p{i}" for i in range(n)]
    np.save(cache / "image_emb.npy", rng.normal(size=(n, d)).astype(np.float32))
    np.save(cache / "text_emb.npy", rng.normal(size=(n, d)).astype(np.float32))
    np.save(cache / "text_tokens.npy", rng.normal(size=(n, length, d)).astype(np.float16))
    np.save(cache / "text_mask.npy", rng.random((n, length)) > 0.3)
    np.save(cache / "has_image.npy", rng.random(n) > 0.2)
    (cache / "post_ids.json").write_text(json.dumps(ids))
    labels = np.where(np.arange(n) % 4 == 3, np.nan, rng.normal(6, 2, n))
    pd.DataFrame({"post_id": ids, "label": labels, "subcategory": [f"s{i % 3}" for i in range(n)],
                  "category": [f"c{i % 2}" for i in range(n)]}).to_parquet(tmp_path / "posts.parquet")
    folds = np.where(np.isnan(labels), -1, np.arange(n) % 3)
    pd.DataFrame({"post_id": ids, "fold": folds}).to_parquet(tmp_path / "folds.parquet")
    (tmp_path / "vocab.json").write_text(json.dumps({"subcategory": ["s0", "s1", "s2"], "category": ["c0", "c1"]}))
    return [str(cache), str(tmp_path / "posts.parquet"), str(tmp_path / "folds.parquet"), str(tmp_path / "vocab.json")]


class _CountingArray:
    """Wraps a cache array and counts reads (or refuses them)."""

    def __init__(self, arr, refuse: bool = False):
        self.arr, self.refuse, self.reads = arr, refuse, 0
        self.shape, self.dtype = arr.shape, arr.dtype

    def __getitem__(self, idx):
        if self.refuse:
            raise AssertionError("this cache array must not be read")
        self.reads += 1
        return self.arr[idx]

    def __len__(self):
        return len(self.arr)


def test_cached_loader_gathers_per_batch_and_reads_only_the_fields_used(tmp_path):
    import numpy as np

    from popstack.datamodules.cached import EmbeddingDataModule

    paths = _tiny_cache(tmp_path)
    full = EmbeddingDataModule(*paths, fold=0, batch_size=8)
    ref = full.dataset(full.train_idx)
    batches = list(full.train_dataloader())
    order = [pid for b in batches for pid in b["post_id"]]
    pos = {pid: i for i, pid in enumerate(ref.cache["post_ids"])}
    for b in batches:  # every field equals the row's cached values, in the sampler's order
        rows = [pos[p] for p in b["post_id"]]
        np.testing.assert_array_equal(b["image_emb"].numpy(), np.asarray(ref.cache["image_emb"])[rows])
        np.testing.assert_array_equal(b["text_tokens"].numpy(), np.asarray(ref.cache["text_tokens"])[rows])
        np.testing.assert_array_equal(b["text_mask"].numpy(), np.asarray(ref.cache["text_mask"])[rows])
        assert b["text_tokens"].dtype == torch.float32 and b["label"].dtype == torch.float32
    train_ids = {ref.cache["post_ids"][r] for r in full.train_idx}
    assert len(set(order)) == len(order) == 16 and set(order) <= train_ids  # 20 rows, batch 8, last dropped
    one = ref[3]
    assert one["post_id"] == ref.cache["post_ids"][ref.indices[3]] and one["image_emb"].shape == (8,)

    slim = EmbeddingDataModule(*paths, fold=0, batch_size=8, fields=("image_emb", "text_emb"))
    slim.cache["image_emb"] = counter = _CountingArray(slim.cache["image_emb"])
    slim.cache["text_tokens"] = _CountingArray(slim.cache["text_tokens"], refuse=True)
    slim.cache["text_mask"] = _CountingArray(slim.cache["text_mask"], refuse=True)
    loader = slim.train_dataloader()
    got = list(loader)
    assert counter.reads == len(got) == len(loader)  # one gather per batch
    assert "text_tokens" not in got[0] and got[0]["image_emb"].shape == (8, 8)
    assert EmbeddingDataModule(*paths, fold=0, num_workers=2).train_dataloader().num_workers == 2


def _regression(n: int = 300, seed: int = 0):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, 6)).astype(np.float32), columns=[f"f{i}" for i in range(6)])
    y = 6 + 2 * X.f0.to_numpy() + X.f1.to_numpy() ** 2 + rng.normal(0, 0.3, n)
    return X, y


def test_auto_learning_rate_and_threads_resolve_per_fit():
    from popstack.stacking.members import auto_learning_rate, available_cores, fit_params

    assert auto_learning_rate(3_000) == 0.1
    assert auto_learning_rate(100) == 0.2 and auto_learning_rate(10_000_000) == 0.02
    assert auto_learning_rate(3_000) > auto_learning_rate(300_000)
    p = fit_params({"learning_rate": "auto", "thread_count": "auto", "depth": 6}, 3_000, "learning_rate",
                   "thread_count")
    assert p == {"learning_rate": 0.1, "thread_count": 1, "depth": 6}  # small fits: one thread
    big = fit_params({"num_threads": "auto"}, 10**7, "learning_rate", "num_threads")
    assert big == {"num_threads": available_cores()}  # large fits: every core, never more
    p = fit_params({"learning_rate": 0.05, "num_threads": 0}, 10, "learning_rate", "num_threads")
    assert p == {"learning_rate": 0.05, "num_threads": 0}  # explicit values pass through


def test_catboost_gpu_refusal_falls_back_to_cpu_without_cpu_only_params(monkeypatch):
    from popstack.stacking.members import catboost as members
    from popstack.stacking.members import make_member

    monkeypatch.setattr(members, "catboost_gpu_count", lambda: 1)  # claims a GPU this machine lacks
    X, y = _regression()
    params = {"iterations": 30, "learning_rate": "auto", "depth": 3, "rsm": 0.5, "loss_function": "Huber:delta=1.0",
              "eval_metric": "MAE", "early_stopping_rounds": 10, "thread_count": 1, "use_gpu": "auto"}
    member = make_member("catboost", params, [], 0)
    assert "rsm" not in member._model(len(X), gpu=True).get_params()
    member.fit(X[:200], y[:200], X[200:], y[200:])  # the GPU trainer fails here; the CPU one fits
    assert member.model.get_params()["task_type"] == "CPU" and member.model.get_params()["rsm"] == 0.5
    assert abs(member.predict(X[200:]) - y[200:]).mean() < 1.5
