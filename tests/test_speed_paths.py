"""Speed paths that must not change results: cut prompts, reused prompt embeddings, per-batch cache gathers,
shared feature matrices, member thread/device settings."""

from __future__ import annotations

import torch

from lightning_modules.backbone import encode_text_embeddings, load_backbone
from lightning_modules.prompt_learner import DualGrainedPromptLearner

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
