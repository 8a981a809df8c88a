"""CMPA-DGPL pieces on the tiny CLIP: local aggregation, frozen CLIP, shapes, checkpoints, pretrained files."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from popstack.lightning_modules.backbone import TINY_MODEL, encode_posts, load_backbone
from popstack.lightning_modules.prompt_learner import local_similarity
from popstack.lightning_modules.prompt_prototype_module import PromptPrototypeModule
from popstack.lightning_modules.prototype_classifier import CrossModalPrototypeClassifier
from popstack.lightning_modules.prototypes import prototype_means, select_prototype_posts
from tests.helpers import module_args, quiet_trainer

CLASSES = ["Cats", "Dogs", "Guys,Fashion"]
K, D, L_TOK = 3, 64, 8


def test_local_aggregation_matches_hand_computation():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # third position is padding
    mask = torch.tensor([[True, True, False]])
    classes = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    tau_s = 0.5
    out = local_similarity(tokens, mask, classes, tau_s)
    # class 0: cos = [1, 0] -> w = softmax([2, 0]) -> 1*w0 + 0*w1
    w0 = math.exp(2) / (math.exp(2) + 1)
    # class 1: cos = [1/sqrt2, 1/sqrt2] -> equal weights -> 1/sqrt2
    assert out[0, 0].item() == pytest.approx(w0, rel=1e-5)
    assert out[0, 1].item() == pytest.approx(1 / math.sqrt(2), rel=1e-5)
    tokens[0, 2] = torch.tensor([-3.0, 7.0])  # a padded token must not count
    assert torch.allclose(local_similarity(tokens, mask, classes, tau_s), out)


def cached_batch(n=16, seed=0, separable=False):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    img = torch.randn(n, D, generator=g)
    if separable:
        img = img * 0.3 + torch.nn.functional.one_hot(y, D).float() * 3
    mask = torch.ones(n, L_TOK, dtype=torch.bool)
    mask[:, 5:] = False
    return {"post_id": [str(i) for i in range(n)], "image_emb": img, "text_emb": torch.randn(n, D, generator=g),
            "text_tokens": torch.randn(n, L_TOK, D, generator=g), "text_mask": mask,
            "has_image": torch.ones(n, dtype=torch.bool), "subcategory_id": y, "category_id": torch.zeros(n).long(),
            "label": torch.rand(n, generator=g) * 10}


def make_module(**kw):
    torch.manual_seed(0)
    args = {"backbone_name": TINY_MODEL, "backbone_pretrained": None, "trainable_last_blocks": 0, "n_ctx": 4,
            "proj_dim": 32, "heads": 2, "token_len": L_TOK, "regression_hidden": 16, "lr": 1e-2,
            "scheduler": "constant", "learn_tau": False, "regression_weight": 1.0, **kw}  # with the popularity head
    m = PromptPrototypeModule(CLASSES, **module_args("prompt_prototype", **args))
    m.set_prototypes(torch.randn(K, D), torch.randn(K, D))
    return m



def loader(batches):
    return DataLoader(batches, batch_size=None)


def reference_classifier(clf, x, visual, textual):
    """Eqs. 6-7 as written: ``nn.MultiheadAttention`` + LayerNorm over each post's (1 + 2K)-token sequence, the
    cosines of x~ with every attended prototype, and the posterior means of V~ and T~."""
    k = len(visual)
    post, shared = clf.proj_image(x), torch.cat([clf.proj_image(visual), clf.proj_text(textual)])
    seq = torch.cat([post.unsqueeze(1), shared.unsqueeze(0).expand(len(x), -1, -1)], dim=1)
    attended, _ = clf.attention(seq, seq, seq, need_weights=False)
    seq = clf.norm(seq + attended)
    x_t, v_t, t_t = seq[:, 0], seq[:, 1:1 + k], seq[:, 1 + k:]
    xn = torch.nn.functional.normalize(x_t, dim=-1).unsqueeze(1)
    cos_v = (xn * torch.nn.functional.normalize(v_t, dim=-1)).sum(-1)
    cos_t = (xn * torch.nn.functional.normalize(t_t, dim=-1)).sum(-1)
    p_v = (cos_v * clf.log_scale_v.exp()).softmax(-1)
    p_t = (cos_t * clf.log_scale_t.exp()).softmax(-1)
    return {"x": x_t, "cos_v": cos_v, "cos_t": cos_t, "v_tilde": torch.einsum("bk,bkd->bd", p_v, v_t),
            "t_tilde": torch.einsum("bk,bkd->bd", p_t, t_t)}


@pytest.mark.parametrize("heads", [1, 4])
def test_classifier_is_attention_and_layernorm_over_the_whole_sequence(heads):
    """The classifier (prototype attention once per batch, LayerNorm'd tokens through their inner products, never
    a (B, K, d) tensor) gives the outputs and gradients of eqs. 6-7 written out over each post's sequence, with the
    same weights; LayerNorm's weight and bias are moved off their initial 1 and 0 so every term counts."""
    torch.manual_seed(0)
    clf = CrossModalPrototypeClassifier(D, 16, heads).double()
    with torch.no_grad():
        clf.norm.weight.uniform_(0.5, 1.5)
        clf.norm.bias.normal_(0, 0.3)
    x, visual, textual = (torch.randn(n, D, dtype=torch.float64) for n in (5, 7, 7))
    reference = reference_classifier(clf, x, visual, textual)
    out = clf(x, visual, textual)
    for key, value in reference.items():
        torch.testing.assert_close(out[key], value, rtol=1e-9, atol=1e-10, msg=key)
    weights = [p for p in clf.parameters()]
    targets = {key: torch.randn_like(value) for key, value in reference.items()}

    def grads(outputs):
        total = sum((outputs[key].double() * target).sum() for key, target in targets.items())
        return torch.autograd.grad(total, weights)

    for name, a, b in zip([n for n, _ in clf.named_parameters()], grads(reference), grads(out)):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10, msg=name)


def test_output_shapes():
    m = make_module()
    out = m(cached_batch())
    assert out["global_logits"].shape == (16, K) and out["local_logits"].shape == (16, K)
    assert out["proto_logits"].shape == (16, K)
    assert out["x"].shape == (16, 32) and out["v_tilde"].shape == (16, 32) and out["t_tilde"].shape == (16, 32)
    assert out["prediction"].shape == (16,)
    pred = m.predict_step(cached_batch(), 0)
    assert len(pred["post_id"]) == 16 and pred["prediction"].shape == (16,) and pred["class_loss"].shape == (16,)
    widths = {"f_i": D, "f_t": D, "w_g": K, "w_l": K, "x_tilde": 32, "v_tilde": 32, "t_tilde": 32}  # eq. 11
    for block, width in widths.items():
        assert pred[block].shape == (16, width), block
    torch.testing.assert_close(pred["x_tilde"], out["x"])
    torch.testing.assert_close(pred["v_tilde"], out["v_tilde"])


def test_without_popularity_head_no_prediction_and_per_post_class_loss():
    m = make_module(regression_weight=0.0).eval()
    batch = cached_batch()
    batch["subcategory_id"][0] = K + 5  # a class unknown to training: no loss
    with torch.no_grad():
        out = m(batch)
        pred = m.predict_step(batch, 0)
    assert "prediction" not in out and "prediction" not in pred and m.regressor is None
    loss = pred["class_loss"]
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1:]).all()
    known = {k: v[1:] for k, v in batch.items()}
    with torch.no_grad():
        total = m.losses(m(known), known)["loss"]
    torch.testing.assert_close(loss[1:].mean(), total, rtol=1e-5, atol=1e-5)  # per-post terms of eq. 8


def test_only_prompt_prototype_parameters_train():
    m = make_module()
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    trainer = quiet_trainer(max_steps=3)
    trainer.fit(m, train_dataloaders=loader([cached_batch(seed=s) for s in range(3)]))
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("prompts.ctx_global") for k in changed)
    assert any(k.startswith("prompts.ctx_local") for k in changed)
    assert any(k.startswith("classifier.") for k in changed)
    assert not [k for k in changed if k.startswith("clip.")], "CLIP weights must stay frozen"
    assert all(not p.requires_grad for p in m.clip.parameters())
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[0] in ("prompts", "classifier", "regressor") for n in trainable)


def test_prompt_contexts_get_their_own_learning_rate():
    m = make_module(prompt_lr=0.5, learn_tau=True)
    opt = m.configure_optimizers()
    rest, prompt = opt.param_groups
    assert rest["lr"] == pytest.approx(1e-2) and prompt["lr"] == pytest.approx(0.5)
    ids = {id(p) for p in prompt["params"]}
    assert ids == {id(m.prompts.ctx_global), id(m.prompts.ctx_local), id(m.log_scale), id(m.log_inv_tau_s)}
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert ids | {id(p) for p in rest["params"]} == trainable and not ids & {id(p) for p in rest["params"]}
    same = make_module().configure_optimizers().param_groups  # prompt_lr None: one learning rate for all
    assert [g["lr"] for g in same] == [1e-2, 1e-2]


@pytest.mark.slow
def test_learns_separable_classes():
    m = make_module(regression_weight=0.0)
    batches = [cached_batch(32, seed=s, separable=True) for s in range(8)]
    trainer = quiet_trainer(max_epochs=8)
    trainer.fit(m, train_dataloaders=loader(batches))
    test = cached_batch(64, seed=99, separable=True)
    acc = (m(test)["proto_logits"].argmax(-1) == test["subcategory_id"]).float().mean().item()
    assert acc > 0.8  # chance is 1/3


def test_checkpoint_reload_identical_outputs(tmp_path):
    m = make_module()
    trainer = quiet_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(m, train_dataloaders=loader([cached_batch(seed=s) for s in range(2)]))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    torch.load(path, weights_only=True)  # no pickled objects
    m.eval()
    back = PromptPrototypeModule.load_from_checkpoint(path, backbone_pretrained=None, weights_only=True).eval()
    batch = cached_batch(seed=7)
    with torch.no_grad():
        a, b = m(batch), back(batch)
    for key in ("global_logits", "local_logits", "proto_logits", "prediction"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_pretrained_file_route_and_raw_equals_cached(tmp_path):
    torch.manual_seed(1)
    bb = load_backbone(TINY_MODEL)
    path = tmp_path / "tiny_clip.pt"
    torch.save(bb.model.state_dict(), path)
    again = load_backbone(TINY_MODEL, str(path))
    ids = bb.tokenizer(["a dog on a beach", "sunset"])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = encode_posts(bb.model.eval(), images, ids, L_TOK)
        b = encode_posts(again.model.eval(), images, ids, L_TOK)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    m = PromptPrototypeModule(CLASSES, **module_args(
        "prompt_prototype", backbone_name=TINY_MODEL, backbone_pretrained=str(path), trainable_last_blocks=0,
        n_ctx=2, proj_dim=16, heads=2, token_len=L_TOK, learn_tau=False)).eval()
    m.set_prototypes(torch.randn(K, D), torch.randn(K, D))
    raw = {"post_id": ["1", "2"], "image": images, "text_ids": ids, "has_image": torch.ones(2, dtype=torch.bool),
           "subcategory_id": torch.tensor([0, 1]), "category_id": torch.tensor([0, 0]),
           "label": torch.tensor([1.0, 2.0])}
    cached = {**raw, **a}
    del cached["image"], cached["text_ids"]
    with torch.no_grad():
        r, c = m(raw), m(cached)
    torch.testing.assert_close(r["proto_logits"], c["proto_logits"])
    torch.testing.assert_close(r["local_logits"], c["local_logits"])


def test_prototype_sampling_is_diverse():
    # class 0: 4 time bins x 2 concepts x 3 users; ask for 8 shots
    rows = []
    for t in range(4):
        for c in range(2):
            for u in range(3):
                rows.append({"postdate": t * 1000 + c * 10 + u, "concept": f"c{c}", "uid": f"u{u}",
                             "subcategory_id": 0})
    rows.append({"postdate": 5, "concept": "c0", "uid": "u0", "subcategory_id": -1})  # unknown class: skipped
    posts = pd.DataFrame(rows)
    chosen = select_prototype_posts(posts, shots=8, n_time_bins=4, seed=0)
    assert set(chosen) == {0}
    picked = posts.iloc[chosen[0]]
    assert len(picked) == 8
    assert (picked.postdate // 1000).value_counts().tolist() == [2, 2, 2, 2]  # proportional over time
    for _, grp in picked.groupby(picked.postdate // 1000):
        assert grp.concept.nunique() == 2  # both subtopics in every interval
    assert picked.uid.nunique() == 3
    assert select_prototype_posts(posts, shots=8, seed=0)[0].tolist() == chosen[0].tolist()


def test_prototypes_without_images_use_the_texts_and_count_those_classes_as_filled():
    """Without a readable image the visual prototype falls back to the class name; the textual one is the posts'
    mean, so the class counts as filled (the build's log line counts only classes without any usable post)."""
    image, text = np.arange(12.0).reshape(6, 2), -np.arange(12.0).reshape(6, 2)
    fallback = np.full((3, 2), 9.0)
    chosen = {0: np.array([0, 1]), 1: np.array([2])}  # class 2 has no post
    no_image, with_text = np.zeros(6, dtype=bool), np.array([True, True, False, True, True, True])
    visual, textual, filled = prototype_means(chosen, image, text, with_text, no_image, 3, fallback)
    assert filled.tolist() == [True, False, False]  # class 1's only post has neither an image nor a text
    np.testing.assert_allclose(visual, fallback)
    np.testing.assert_allclose(textual[0], text[[0, 1]].mean(0))
    np.testing.assert_allclose(textual[1:], fallback[1:])
