"""The teachers through `load_teacher`, offline: real MiniLM weights, a tiny random SigLIP saved to a folder,
and a tiny jina-clip-style remote-code model (written out here) loaded with trust_remote_code."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dataclasses
import json
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import teacher.encoders as teacher_module
from teacher.encoders import TeacherConfig, embed_items, item_text, load_teacher

WORDS = "red running shoes crimson sneakers for jogging a history of the roman empire blue mug lamp".split()


def _images(n: int, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _assert_unit(x: np.ndarray, n: int, dim: int) -> None:
    assert x.shape == (n, dim) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- minilm


@pytest.fixture(scope="module")
def minilm():
    return load_teacher(TeacherConfig(name="minilm"))


def test_minilm_real_weights_unit_vectors_and_semantics(minilm):
    v = minilm.embed_texts(
        ["red running shoes", "crimson sneakers for jogging", "a history of the roman empire"]
    )
    _assert_unit(v, 3, 384)
    assert minilm.dim == 384 and not minilm.supports_images
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    assert minilm.embed_texts([]).shape == (0, 384)


def test_minilm_model_id_stable_across_loads(minilm):
    again = load_teacher(TeacherConfig(name="minilm", batch_size=2))
    assert again.model_id == minilm.model_id
    # Named by the upstream id, not by where this venv lies; the suffix is the weights' sha256.
    assert minilm.model_id.startswith("minilm:sentence-transformers/all-MiniLM-L6-v2@")
    assert len(minilm.model_id.rsplit("@", 1)[1]) == 12
    texts = ["red running shoes", "blue mug", "lamp"]  # batching does not change the vectors
    np.testing.assert_allclose(again.embed_texts(texts), minilm.embed_texts(texts), atol=1e-5)


def test_bf16_embedding_stays_in_the_same_space(minilm):
    """precision="bf16" runs the forward under bfloat16 autocast: float32 unit rows, the same model id,
    within rounding of the fp32 vectors, and the same nearest neighbours."""
    texts = [" ".join(WORDS[i : i + 1 + i % 5]) for i in range(len(WORDS) - 1)]
    half = load_teacher(TeacherConfig(name="minilm", precision="bf16"))
    assert half.model_id == minilm.model_id
    full, low = minilm.embed_texts(texts), half.embed_texts(texts)
    _assert_unit(low, len(texts), 384)
    cos = (full * low).sum(axis=1)
    assert cos.min() > 0.999
    assert not np.allclose(full, low, atol=1e-6)  # it did run in bfloat16
    assert ((full @ full.T).argsort(axis=1)[:, -2] == (low @ low.T).argsort(axis=1)[:, -2]).mean() > 0.9


# ---------------------------------------------------------------------------------------------- siglip


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    folder = tmp_path_factory.mktemp("siglip")
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "</s>", *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", model_max_length=16
    ).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = SiglipConfig(
        text_config=dict(
            vocab_size=len(vocab),
            max_position_embeddings=16,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=2,
            **small,
        ),
        vision_config=dict(image_size=32, patch_size=8, **small),
    )
    SiglipModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def siglip(siglip_dir):
    return load_teacher(TeacherConfig(name="siglip", path=str(siglip_dir), batch_size=2))


def test_siglip_text_and_image_shapes_unit_norm_deterministic(siglip, siglip_dir):
    texts = ["red running shoes", "blue mug", "a history of the roman empire"]
    t = siglip.embed_texts(texts)
    i = siglip.embed_images(_images(3))
    _assert_unit(t, 3, 32)
    _assert_unit(i, 3, 32)
    assert siglip.supports_images and siglip.text_length == 16
    np.testing.assert_array_equal(siglip.embed_texts(texts), t)
    again = load_teacher(TeacherConfig(name="siglip", path=str(siglip_dir)))
    assert again.model_id == siglip.model_id
    np.testing.assert_allclose(again.embed_images(_images(3)), i, atol=1e-5)  # batch 64 vs 2: same vectors


def test_siglip_refuses_truncation_and_a_larger_dim(siglip_dir):
    with pytest.raises(ValueError, match="larger than"):
        load_teacher(TeacherConfig(name="siglip", path=str(siglip_dir), dim=64))
    with pytest.raises(ValueError, match="Matryoshka"):
        load_teacher(TeacherConfig(name="siglip", path=str(siglip_dir), dim=16))


# ---------------------------------------------------------------------------------------------- jina-clip-v2

CONFIGURATION_PY = """
from transformers import PretrainedConfig


class TinyJinaClipConfig(PretrainedConfig):
    model_type = "tiny_jina_clip"

    def __init__(self, vocab_size=97, hidden_size=16, projection_dim=24, image_size=8, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.projection_dim = projection_dim
        self.image_size = image_size
        super().__init__(**kwargs)
"""

# Like jina's: encode_* take lists, return numpy, normalise and THEN truncate (rows shorter than 1).
MODELING_PY = """
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .configuration_tiny_jina_clip import TinyJinaClipConfig


class TinyJinaClipModel(PreTrainedModel):
    config_class = TinyJinaClipConfig

    def __init__(self, config):
        super().__init__(config)
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim)
        self.visual_projection = nn.Linear(3 * config.image_size**2, config.projection_dim)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.5)

    def _finish(self, x, truncate_dim):
        x = F.normalize(x, dim=-1)
        return (x[:, :truncate_dim] if truncate_dim else x).detach().numpy()

    def encode_text(self, sentences, batch_size=32, truncate_dim=None, **kwargs):
        rows = [[b % self.config.vocab_size for b in s.encode()] or [0] for s in sentences]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows]).unsqueeze(-1)
        mean = (self.token_embedding(ids) * mask).sum(1) / mask.sum(1)  # (B, H)
        return self._finish(self.text_projection(mean), truncate_dim)

    def encode_image(self, images, batch_size=32, truncate_dim=None, **kwargs):
        size = (self.config.image_size, self.config.image_size)
        pixels = np.stack([np.asarray(im.convert("RGB").resize(size), dtype=np.float32) / 255.0 for im in images])
        return self._finish(self.visual_projection(torch.from_numpy(pixels).flatten(1)), truncate_dim)
"""


@pytest.fixture(scope="module")
def jina_dir(tmp_path_factory) -> Path:
    from transformers import AutoConfig, AutoModel

    # transformers copies remote code to ~/.cache/huggingface/modules under the folder's name: keep it unique
    # so concurrent runs never share (or race on) one module.
    folder = tmp_path_factory.mktemp(f"tiny_jina_clip_{uuid.uuid4().hex[:8]}", numbered=False)
    (folder / "configuration_tiny_jina_clip.py").write_text(textwrap.dedent(CONFIGURATION_PY))
    (folder / "modeling_tiny_jina_clip.py").write_text(textwrap.dedent(MODELING_PY))
    auto_map = {
        "AutoConfig": "configuration_tiny_jina_clip.TinyJinaClipConfig",
        "AutoModel": "modeling_tiny_jina_clip.TinyJinaClipModel",
    }
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny_jina_clip", "auto_map": auto_map}))
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    AutoModel.from_config(config, trust_remote_code=True).save_pretrained(folder)
    return folder


def test_jina_remote_code_from_local_folder_native_and_truncated(jina_dir):
    full = load_teacher(TeacherConfig(name="jina-clip-v2", path=str(jina_dir)))
    assert full.dim == 24 and full.supports_images
    t, i = full.embed_texts(["red running shoes", "blue mug"]), full.embed_images(_images(2))
    _assert_unit(t, 2, 24)
    _assert_unit(i, 2, 24)

    small = load_teacher(TeacherConfig(name="jina-clip-v2", path=str(jina_dir), dim=8))
    assert small.dim == 8 and small.model_id == full.model_id
    ts, is_ = small.embed_texts(["red running shoes", "blue mug"]), small.embed_images(_images(2))
    _assert_unit(ts, 2, 8)
    _assert_unit(is_, 2, 8)
    np.testing.assert_allclose(ts, t[:, :8] / np.linalg.norm(t[:, :8], axis=1, keepdims=True), atol=1e-5)

    with pytest.raises(ValueError, match="larger than"):
        load_teacher(TeacherConfig(name="jina-clip-v2", path=str(jina_dir), dim=25))


def test_jina_refuses_unpinned_remote_code(tmp_path, monkeypatch):
    monkeypatch.setattr(teacher_module, "JINA_CLIP_V2_REVISION", None)
    with pytest.raises(ValueError, match="pinned revision"):
        load_teacher(TeacherConfig(name="jina-clip-v2", path="someone/clip-lookalike"))
    with pytest.raises(ValueError, match="pinned revision"):  # the default hub id, until the pins are set
        load_teacher(TeacherConfig(name="jina-clip-v2"))
    # A local folder whose config fetches code from another hub repo (as jina-clip-v2's does) needs that pinned.
    auto_map = {"AutoModel": "jinaai/jina-clip-implementation--modeling_clip.JinaCLIPModel"}
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": auto_map}))
    with pytest.raises(ValueError, match="code_revision"):
        load_teacher(TeacherConfig(name="jina-clip-v2", path=str(tmp_path)))


# ---------------------------------------------------------------------------------------------- embed_items


def test_embed_items_fusion_weight_and_fallback(siglip, siglip_dir):
    texts = ["red running shoes", "blue mug", "lamp"]
    images = _images(3)
    t, i = siglip.embed_texts(texts), siglip.embed_images(images)
    for w, expected in [(0.0, t), (1.0, i)]:
        teacher = load_teacher(dataclasses.replace(siglip.config, image_weight=w))
        vectors, n_text = embed_items(teacher, texts, images)
        np.testing.assert_allclose(vectors, expected, atol=1e-5)
        assert n_text == 0

    vectors, n_text = embed_items(siglip, texts, [images[0], None, images[2]])  # w = 0.5
    assert n_text == 1
    _assert_unit(vectors, 3, 32)
    np.testing.assert_allclose(vectors[1], t[1], atol=1e-6)
    mixed = 0.5 * i[[0, 2]] + 0.5 * t[[0, 2]]
    np.testing.assert_allclose(
        vectors[[0, 2]], mixed / np.linalg.norm(mixed, axis=1, keepdims=True), atol=1e-5
    )

    with pytest.raises(ValueError, match="texts but"):
        embed_items(siglip, texts, images[:2])


def test_embed_items_text_only_teacher_falls_back_for_all(minilm):
    texts = ["red running shoes", "blue mug"]
    vectors, n_text = embed_items(minilm, texts, _images(2))
    assert n_text == 2
    np.testing.assert_allclose(vectors, minilm.embed_texts(texts), atol=1e-6)
    with pytest.raises(ValueError, match="text-only"):
        minilm.embed_images(_images(1))


# ---------------------------------------------------------------------------------------------- config, text


def test_config_errors():
    with pytest.raises(ValueError, match="unknown teacher 'clip'"):
        load_teacher(TeacherConfig(name="clip"))
    with pytest.raises(ValueError, match="image_weight"):
        TeacherConfig(image_weight=1.5)
    with pytest.raises(ValueError, match="larger than minilm's native 384"):
        load_teacher(TeacherConfig(name="minilm", dim=512))
    with pytest.raises(ValueError, match="needs TeacherConfig\\(path"):
        load_teacher(TeacherConfig(name="siglip"))
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, got 'fp16'"):
        TeacherConfig(precision="fp16")


def test_item_text():
    assert item_text("Toy Story (1995)", "Adventure, Animation") == "Toy Story (1995). Adventure, Animation"
    assert item_text("Done.", "tags") == "Done. tags"
    assert item_text("  Lamp ", None) == "Lamp"
    assert item_text("Lamp", "  ") == "Lamp"
    assert item_text("", "only text") == "only text"


def test_batches_sorted_by_text_length_give_the_same_vectors_in_catalogue_order(sample_workspace, tmp_path):
    """`vlmrec embed` batches texts of similar length (less padding); the file keeps the catalogue's order
    and each item's vector is the one batching in catalogue order gives, in this process (the fixture's: a
    small catalogue) or on a Ray Data pool."""
    import shutil

    import pyarrow.parquet as pq

    from teacher.embed import EmbedConfig, embed_catalogue
    from vlmrec.workspace import Workspace

    sorted_table = pq.read_table(sample_workspace.embeddings).to_pandas()  # the fixture's: sorted, in process
    ws = Workspace(tmp_path / "ws")
    (ws.root / "data").mkdir(parents=True)
    shutil.copy(sample_workspace.items, ws.items)
    summary = embed_catalogue(
        ws, EmbedConfig(batch_size=16, num_actors=1, sort_by_length=False, in_process_max_items=0)
    )
    assert summary["actors"] == 1  # on Ray Data
    plain = pq.read_table(ws.embeddings).to_pandas()
    catalogue = pq.read_table(ws.items, columns=["item_id", "event_timestamp"]).to_pandas()
    assert sorted_table["item_id"].tolist() == plain["item_id"].tolist() == catalogue["item_id"].tolist()
    np.testing.assert_allclose(np.stack(sorted_table["vector"]), np.stack(plain["vector"]), atol=1e-5)
    # windows of 37 rows (the last one shorter), each sorted on its own, through the default pool (it grows
    # to one actor per CPU but one): the same file, timestamps included
    summary = embed_catalogue(ws, EmbedConfig(batch_size=16, window=37, in_process_max_items=0))
    windowed = pq.read_table(ws.embeddings).to_pandas()
    assert len(catalogue) % 37 and summary["items"] == len(catalogue) and summary["dim"] == 384
    assert summary["actors"] >= 1
    assert windowed["item_id"].tolist() == catalogue["item_id"].tolist()
    assert (windowed["event_timestamp"] == catalogue["event_timestamp"]).all()
    np.testing.assert_allclose(np.stack(windowed["vector"]), np.stack(plain["vector"]), atol=1e-5)
    assert (
        pq.read_schema(ws.embeddings).field("vector").type
        == pq.read_schema(sample_workspace.embeddings).field("vector").type
    )
    # the same windows in this process: the same file
    summary = embed_catalogue(ws, EmbedConfig(batch_size=16, window=37))
    here = pq.read_table(ws.embeddings).to_pandas()
    assert summary["actors"] == 0 and here["item_id"].tolist() == catalogue["item_id"].tolist()
    assert (here["event_timestamp"] == catalogue["event_timestamp"]).all()
    np.testing.assert_allclose(np.stack(here["vector"]), np.stack(plain["vector"]), atol=1e-5)


@pytest.mark.parametrize("in_process_max_items", [2_000, 0], ids=["in-process", "ray-data"])
def test_a_teacher_that_does_not_load_ends_embed_in_one_error_naming_it(
    sample_workspace, tmp_path, in_process_max_items
):
    """A teacher that does not load (an unpinned hub id) ends `vlmrec embed` in one ValueError naming --teacher
    (the CLI's error line), in this process or in the Ray Data pool's actors, whose failing constructor would
    end the run in Ray's traceback; no file is written."""
    import shutil

    from teacher.embed import EmbedConfig, embed_catalogue
    from vlmrec.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    (ws.root / "data").mkdir(parents=True)
    shutil.copy(sample_workspace.items, ws.items)
    teacher = TeacherConfig(name="siglip", path="someone/siglip-not-pinned")
    config = EmbedConfig(teacher=teacher, num_actors=1, in_process_max_items=in_process_max_items)
    with pytest.raises(ValueError, match=r"^--teacher: siglip did not load: .*needs a pinned revision"):
        embed_catalogue(ws, config)
    assert not ws.embeddings.exists()


def test_embed_precision_flag(capsys):
    import argparse

    from teacher.embed import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args([])).teacher.precision == "fp32"
    assert config_from_args(parser.parse_args(["--precision", "bf16"])).teacher.precision == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "fp16"])
    assert "--precision: invalid choice: 'fp16'" in capsys.readouterr().err
