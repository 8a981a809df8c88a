"""A dataset without a readable image (issue 22 point 5): the embedding cache never runs the image tower, modules
whose input is essentially the image are not trained, and the F blocks that are the image alone are left out;
the text side still runs. With images nothing changes (the other pipeline tests)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from popstack.datamodules.synthetic import make_posts, write_smpd
from tests.helpers import compose_fast, module_args

IMAGE_ONLY_BLOCKS = ("f_i_", "x_tilde_", "v_tilde_", "t_tilde_")


def test_encode_posts_without_images_never_runs_the_image_tower():
    from popstack.lightning_modules.backbone import encode_posts, load_backbone

    bb = load_backbone("popstack-tiny-clip", None)

    def no_image_tower(*args, **kwargs):
        raise AssertionError("the image tower ran")

    bb.model.encode_image = no_image_tower
    images = torch.zeros(2, 3, bb.image_size, bb.image_size, dtype=torch.uint8)
    text = torch.zeros(2, bb.context_length, dtype=torch.long)
    text[:, 0], text[:, 1] = 1, 2
    with torch.no_grad():
        out = encode_posts(bb.model, images, text, token_len=4, image_grid=2, images=False)
    assert "image_tokens" not in out and out["image_emb"].shape == out["text_emb"].shape
    assert not out["image_emb"].any()


def test_a_module_on_raw_batches_follows_the_run_and_skips_the_image_tower():
    """Modules trained over the shards (trainable CLIP blocks) encode raw batches the way the cache was encoded."""
    from popstack.lightning_modules.regressors import CLIPHierarchicalPredictor

    module = CLIPHierarchicalPredictor(**module_args("hierarchical", embed_dim=32, hidden=[8],
                                                        backbone_name="popstack-tiny-clip"))
    size, context = module.clip.visual.image_size, module.tokenizer("a").shape[1]
    batch = {"image": torch.zeros(2, 3, *((size,) * 2 if isinstance(size, int) else size), dtype=torch.uint8),
             "text_ids": torch.ones(2, context, dtype=torch.long)}
    assert module.encode(batch)["image_emb"].abs().sum() > 0  # with images: the tower runs (a blank is not zero)

    def no_image_tower(*args, **kwargs):
        raise AssertionError("the image tower ran")

    module.clip.encode_image = no_image_tower
    module.encode_images = False
    with torch.no_grad():
        assert not module.encode(batch)["image_emb"].any()


def test_image_only_modules_are_declared_on_their_classes(tmp_path):
    from popstack.lightning_modules.registry import module_specs
    from popstack.pipeline.neural import enabled_modules, image_f_blocks, image_skipped, image_token_grid

    cfg = compose_fast(tmp_path)
    every = enabled_modules(cfg)
    assert set(every) == {n for n, s in module_specs().items() if s.config().enabled}  # the default enables these
    assert {"prompt_prototype", "co_attention", "hierarchical"} <= set(every)
    skipped = image_skipped(cfg)
    assert list(skipped) == ["co_attention"] and "patch tokens" in skipped["co_attention"]
    assert enabled_modules(cfg, images=False) == [n for n in every if n != "co_attention"]
    assert image_token_grid(cfg) > 0 and image_token_grid(cfg, images=False) == 0
    assert image_f_blocks(cfg) == {"f_i", "x_tilde", "v_tilde", "t_tilde"}


def test_the_features_stage_and_the_neural_stage_decide_with_one_function(tmp_path):
    from popstack.datamodules.schema import IMAGE_MISSING, IMAGE_OK, IMAGE_UNREADABLE, any_image_readable
    from popstack.features.build import images_readable
    from popstack.features.state import FeatureState

    none = pd.DataFrame({"image_status": [IMAGE_MISSING, IMAGE_UNREADABLE]})
    one = pd.DataFrame({"image_status": [IMAGE_MISSING, IMAGE_OK]})
    assert not any_image_readable(none) and any_image_readable(one) and any_image_readable(pd.DataFrame())
    state = FeatureState()
    assert not images_readable(none, state)
    state.save(tmp_path / "state")
    fitted = FeatureState.load(tmp_path / "state")
    assert not images_readable(one, fitted)  # new posts follow the training run's decision


@pytest.mark.slow
def test_a_dataset_without_images_trains_no_image_module_and_encodes_no_image(tmp_path, monkeypatch, caplog):
    """Every stage, then ``predict.py`` on the same posts: new posts follow the run (no image tower, no
    co_attention checkpoint asked for) and score as the run did."""
    import popstack.pipeline.neural as neural
    from popstack import train
    from popstack.commands.predict import predict

    posts, signal, labels = make_posts(120, 40, seed=3)
    write_smpd(tmp_path / "raw", posts, signal, labels, seed=0, image_mess=False, write_images=False)
    load = neural.load_backbone

    def backbone_without_image_tower(*args, **kwargs):
        bb = load(*args, **kwargs)

        def no_image_tower(*a, **k):
            raise AssertionError("the embedding cache ran the image tower")

        bb.model.encode_image = no_image_tower
        return bb

    monkeypatch.setattr(neural, "load_backbone", backbone_without_image_tower)
    cfg = compose_fast(tmp_path, "data=smpd", f"data.root={tmp_path / 'raw'}", "features.sentence_model=",
                       "stacking.pseudo_rounds=0")
    with caplog.at_level(logging.INFO, logger="popstack"):
        train(cfg)  # every stage: stack and report read what extract wrote
    run = Path(cfg.run_dir)
    lines = [r.getMessage() for r in caplog.records if "no post has a readable image" in r.getMessage()]
    neural_lines = [m for m in lines if m.startswith("neural:")]
    assert len(neural_lines) == 1 and "co_attention skipped" in neural_lines[0], lines
    cache = run / "embeddings"
    assert not (cache / "image_tokens.npy").exists()  # no patch tokens: nothing attends over them
    assert not np.load(cache / "image_emb.npy").any()  # not computed: zeros, one layout for every reader
    assert not (run / "neural" / "co_attention").exists()  # the image-only module was never trained
    assert (run / "neural" / "hierarchical" / "fold0" / "done.json").is_file()  # the text side still runs
    assert (run / "neural" / "prompt_prototype" / "features" / "done.json").is_file()
    feats = pd.read_parquet(run / "neural" / "features.parquet")
    assert not [c for c in feats.columns if any(b in c for b in IMAGE_ONLY_BLOCKS)]
    assert [c for c in feats.columns if "f_t_" in c] and not [c for c in feats.columns if "clip_cos" in c]
    preds = pd.read_parquet(run / "neural" / "predictions.parquet")
    assert "pred_hierarchical" in preds and "pred_co_attention" not in preds
    result = predict(run, tmp_path / "raw", tmp_path / "out.parquet", work_dir=tmp_path / "work")
    trained = pd.read_parquet(run / "predictions.parquet").set_index("post_id")
    all_posts = pd.read_parquet(run / "posts.parquet")
    test_ids = all_posts.post_id[all_posts.split == "test"]
    np.testing.assert_allclose(result.set_index("post_id").loc[test_ids, "popularity_score"].to_numpy(),
                               trained.loc[test_ids, "prediction"].to_numpy(), rtol=1e-4, atol=1e-4)
