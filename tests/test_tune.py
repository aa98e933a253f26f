"""Teacher tuning (teacher/tune/) through its real entry point on tiny worlds built here: a tiny
random BERT (the minilm code path), a tiny random SigLIP, a tiny remote-code CLIP (the jina-clip-v2 code path)
and a LiT image tower. Plus the loss against a direct computation, pair mining at the cut, QLoRA refused
without CUDA, and teacher-id mismatches refused by training, indexing and serving."""

from __future__ import annotations

import json
import math
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from teacher.encoders import TeacherConfig, load_teacher
from teacher.pairs import CO, IMAGE_TITLE, PairConfig, co_engagement_pairs, mine_pairs, pair_labels
from teacher.tune import cli as tune_cli
from teacher.tune import config as tune_config
from teacher.tune import export as tune_export
from teacher.tune import loop as tune_loop
from teacher.tune import model as tune_model
from teacher.tune.losses import SIGLIP_INIT_BIAS, SIGLIP_INIT_LOG_T, infonce_pair_loss, sigmoid_pair_loss
from teacher.weights import weights_digest
from vlmrec.workspace import Workspace

GROUPS = ["apple", "river", "rocket", "violin"]  # what users click together; each has its own colour
FILLERS = ["red", "blue", "big", "small", "old", "new"]
COLOURS = [(220, 40, 40), (40, 60, 220), (40, 200, 60), (230, 200, 40)]
WORDS = GROUPS + FILLERS + ["genres", "tags"]
T0 = pd.Timestamp("2024-01-01", tz="UTC")


# ---------------------------------------------------------------------------------------------- losses


def test_sigmoid_loss_equals_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(4, 5, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(4, 5, generator=g), dim=-1)
    labels = torch.eye(4, dtype=torch.bool)
    labels[0, 2] = True  # an extra in-batch positive
    log_t, bias = torch.tensor(0.7, requires_grad=True), torch.tensor(-1.5, requires_grad=True)
    loss = sigmoid_pair_loss(x, y, log_t, bias, labels)
    direct = 0.0
    for i in range(4):
        for j in range(4):
            z = 1.0 if labels[i, j] else -1.0
            logit = math.exp(0.7) * float(x[i] @ y[j]) - 1.5
            direct += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    assert loss.item() == pytest.approx(direct / 4, rel=1e-5)
    loss.backward()
    assert log_t.grad is not None and bias.grad is not None  # temperature and bias are learned
    assert (SIGLIP_INIT_LOG_T, SIGLIP_INIT_BIAS) == (pytest.approx(math.log(10)), -10.0)  # the paper's init


def test_infonce_is_the_symmetric_cross_entropy():
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    logits = x @ y.T / 0.1
    ce = 0.5 * (
        torch.nn.functional.cross_entropy(logits, torch.arange(6))
        + torch.nn.functional.cross_entropy(logits.T, torch.arange(6))
    )
    assert infonce_pair_loss(x, y, 0.1).item() == pytest.approx(ce.item(), rel=1e-5)
    # K extra rows in y (random negatives) join the x -> y direction only
    extra = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=-1)
    wide = torch.cat([x @ y.T, x @ extra.T], dim=1) / 0.1
    ce = 0.5 * (
        torch.nn.functional.cross_entropy(wide, torch.arange(6))
        + torch.nn.functional.cross_entropy(logits.T, torch.arange(6))
    )
    labels = torch.cat([torch.eye(6, dtype=torch.bool), torch.zeros(6, 3, dtype=torch.bool)], dim=1)
    got = infonce_pair_loss(x, torch.cat([y, extra]), 0.1, labels)
    assert got.item() == pytest.approx(ce.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- pairs


def test_pairs_come_only_from_events_before_the_cut():
    # 10 events; the cut (0.8) keeps the first 8 by time. Items 90, 91 are clicked only after it.
    rows = [(1, 10, 0), (1, 11, 60), (1, 12, 120), (2, 20, 30), (2, 21, 90), (2, 22, 50_000), (1, 13, 180)]
    rows += [(3, 30, 200), (3, 90, 10**6), (3, 91, 10**6 + 60)]
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"])
    events["event_timestamp"] = T0 + pd.to_timedelta(events.pop("ts"), unit="s")
    items = pd.DataFrame(
        {
            "item_id": [10, 11, 30, 90],
            "image_uri": ["a.png", None, "c.png", "d.png"],
            "created_at": [T0, T0, T0, T0 + pd.Timedelta(seconds=10**6)],  # 90 appears after the cut
        }
    )
    cfg = PairConfig(pairs="both", window_s=3600, max_gap=2, valid_fraction=0.1)
    train, valid, counts = mine_pairs(events, items, cfg)
    pairs = pd.concat([train, valid])
    co = pairs[pairs["kind"] == CO]
    got = sorted(map(tuple, co[["a", "b"]].to_numpy().tolist()))
    # user 1: 10-11, 10-12, 11-12, 11-13, 12-13 (gap <= 2); user 2: 20-21 (21-22 is 14 h apart, > window)
    assert got == [(10, 11), (10, 12), (11, 12), (11, 13), (12, 13), (20, 21)]
    it = pairs[pairs["kind"] == IMAGE_TITLE]
    assert sorted(it["a"]) == [10, 30] and (it["a"] == it["b"]).all()  # no image: 11; after the cut: 90
    assert not set(pairs["a"]) & {90, 91} and not set(pairs["b"]) & {90, 91}
    assert counts["train_events"] == 8 and counts["co_engagement_mined"] == 6


def test_co_engagement_window_gap_and_self_pairs():
    events = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1],
            "item_id": [5, 5, 6, 7],
            "event_timestamp": T0 + pd.to_timedelta([0, 10, 20, 7200], unit="s"),
        }
    )
    pairs = co_engagement_pairs(events, window_s=3600, max_gap=3)
    assert sorted(map(tuple, pairs[["a", "b"]].to_numpy().tolist())) == [(5, 6), (5, 6)]  # no 5-5, 7 too late


def test_pair_labels_mark_in_batch_positives():
    a, b = np.array([1, 1, 3, 4]), np.array([2, 5, 2, 1])
    expected = np.array(
        [
            [1, 1, 1, 1],  # a0 == a1 (partner 5 of item 1), b0 == b2 (same partner 2), a0 == b3 (item 1)
            [1, 1, 0, 1],
            [1, 0, 1, 0],
            [0, 0, 0, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(pair_labels(a, b), expected)
    extra = np.array([9, 5, 4])  # random negatives: a positive only where it is the row's own a or b
    hit = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]], bool)
    np.testing.assert_array_equal(pair_labels(a, b, extra), np.concatenate([expected, hit], axis=1))


# ---------------------------------------------------------------------------------------------- tiny world


def _word_tokenizer(folder: Path, **special) -> None:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    names = list(special.values())
    vocab = {tok: i for i, tok in enumerate([*names, *WORDS, "."])}
    tok = Tokenizer(WordLevel(vocab, unk_token=special["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=16, **special).save_pretrained(folder)
    return len(vocab)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT + word tokenizer: loaded by the minilm code path (TeacherConfig(path=...))."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    special = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    n = _word_tokenizer(folder, **special)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=n,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    BertModel(cfg).save_pretrained(folder)
    return folder


def _image(group: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.array(COLOURS[group], np.float32)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """24 items in 4 groups (title words and image colour per group); 60 users who each click the items of
    one group a minute apart: co-engagement and image-title pairs are both learnable."""
    from vlmrec.ingest import IngestConfig, ingest

    root = tmp_path_factory.mktemp("tune_world")
    (root / "images").mkdir()
    ids, titles, uris, groups = [], [], [], []
    for g, word in enumerate(GROUPS):
        for k, filler in enumerate(FILLERS):
            item = 100 + 10 * g + k
            path = root / "images" / f"{item}.png"
            _image(g, item).save(path)
            ids.append(item), titles.append(f"{word} {filler}"), uris.append(str(path)), groups.append(g)
    catalogue = pd.DataFrame(
        {"item_id": ids, "title": titles, "category": [GROUPS[g] for g in groups], "image_uri": uris}
    )
    rng = np.random.default_rng(0)
    rows = []
    for u in range(60):
        g = u % 4
        for k, item in enumerate(rng.permutation([i for i, gg in zip(ids, groups, strict=True) if gg == g])):
            rows.append((u, int(item), T0 + pd.Timedelta(hours=u) + pd.Timedelta(minutes=k)))
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "event_timestamp"])
    ws = Workspace(root / "ws")
    ingest(events, catalogue, ws, IngestConfig(max_len=8))
    return ws, dict(zip(ids, groups, strict=True)), dict(zip(ids, titles, strict=True))


def _tune(ws: Workspace, name: str, *extra: str):
    args = ["--workdir", str(ws.root), "--name", name, "--batch-size", "16", "--max-pairs", "0"]
    args += ["--max-failures", "0"]
    return tune_cli.run(_parse([*args, *extra]))


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    tune_cli.add_arguments(parser)
    return parser.parse_args(argv)


def _separation(vectors: np.ndarray, groups: np.ndarray) -> float:
    """Mean cosine within groups minus between groups."""
    sim = vectors @ vectors.T
    same = groups[:, None] == groups[None, :]
    off = ~np.eye(len(groups), dtype=bool)
    return float(sim[same & off].mean() - sim[~same].mean())


# ---------------------------------------------------------------------------------------------- LoRA, text


@pytest.fixture(scope="module")
def tuned_text(world, bert_dir, ray_local):
    ws, _, _ = world
    digest_before = weights_digest(bert_dir)
    base_cfg = TeacherConfig(name="minilm", path=str(bert_dir))
    probe = [f"{g} {f}" for g in GROUPS for f in FILLERS]
    base_vectors = load_teacher(base_cfg).embed_texts(probe)
    flags = ["--teacher", "minilm", "--teacher-path", str(bert_dir), "--pairs", "co-engagement"]
    flags += ["--epochs", "2", "--lr", "0.01", "--num-workers", "2", "--random-negatives", "4"]
    export_dir, info = _tune(ws, "text", *flags)
    return export_dir, info, base_cfg, base_vectors, probe, digest_before, flags


def test_lora_tuning_lowers_the_loss_and_separates_co_clicked_items(tuned_text, world):
    export_dir, info, base_cfg, base_vectors, probe, _, _ = tuned_text
    _, groups, _ = world
    best = info["best"]
    assert best["val_loss"] < best["val_loss_start"]
    assert info["pairs"]["co_engagement_mined"] > 0 and info["cost"]["pairs_per_s"] > 0
    assert 0 < info["cost"]["trainable_params"] < info["cost"]["total_params"]
    tuned = load_teacher(TeacherConfig(name="minilm", path=str(export_dir / "model")))
    g = np.array([GROUPS.index(p.split()[0]) for p in probe])
    assert _separation(tuned.embed_texts(probe), g) > _separation(base_vectors, g) + 0.05


def test_adapter_save_load_merge_gives_the_same_embeddings(tuned_text):
    from peft import PeftModel

    export_dir, info, base_cfg, _, probe, _, _ = tuned_text
    tuned = json.loads((export_dir / "model" / "teacher.json").read_text())
    assert tuned["teacher_id"] == f"{tuned['base_id']}+lora@{tuned['adapter_digest']}" == info["teacher_id"]
    assert (export_dir / "adapter" / "adapter_model.safetensors").exists()
    assert list((export_dir / "model").glob("*.safetensors"))
    # a fresh base + the saved adapter (unmerged) == the merged export, loaded as a teacher
    base = load_teacher(base_cfg)
    base.model = PeftModel.from_pretrained(base.model, export_dir / "adapter").eval()
    merged = load_teacher(TeacherConfig(name="minilm", path=str(export_dir / "model")))
    np.testing.assert_allclose(merged.embed_texts(probe), base.embed_texts(probe), atol=1e-5)
    assert merged.model_id == info["teacher_id"] and info["merge_max_abs_diff"] < 1e-5


def test_base_weights_are_unchanged(tuned_text, bert_dir):
    _, info, base_cfg, base_vectors, probe, digest_before, _ = tuned_text
    assert weights_digest(bert_dir) == digest_before
    again = load_teacher(base_cfg)
    assert again.model_id == info["base_teacher_id"]
    np.testing.assert_allclose(again.embed_texts(probe), base_vectors, atol=1e-6)


def test_tuning_resumes_from_its_latest_checkpoint(tuned_text, world):
    """A run of its own: resuming re-exports, which must not change the export the other tests read."""
    ws, _, _ = world
    *_, flags = tuned_text
    epochs = flags.index("--epochs") + 1
    _, first = _tune(ws, "resumed", *flags[:epochs], "1", *flags[epochs + 1 :])
    _, info = _tune(ws, "resumed", *flags[:epochs], "2", *flags[epochs + 1 :])  # one more epoch
    assert first["last"]["epoch"] == 1 and info["last"]["resumed_from"] == 1 and info["last"]["epoch"] == 2


def test_tampered_tuned_weights_are_refused(tuned_text, tmp_path):
    import shutil

    export_dir, *_ = tuned_text
    copy = tmp_path / "model"
    shutil.copytree(export_dir / "model", copy)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not the ones teacher.json names"):
        load_teacher(TeacherConfig(name="minilm", path=str(copy)))


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_qlora_without_cuda_fails_with_a_clear_message(world, bert_dir, capsys):
    from vlmrec.cli import main

    ws, _, _ = world
    argv = ["tune", "--workdir", str(ws.root), "--teacher-path", str(bert_dir), "--qlora", "--use-gpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "QLoRA" in err and "CUDA" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="needs --use-gpu"):
        _tune(ws, "q", "--teacher-path", str(bert_dir), "--qlora")
    with pytest.raises(ValueError, match="CUDA device"):  # the loader refuses too, before reading weights
        load_teacher(TeacherConfig(name="minilm", path=str(bert_dir), load_in_4bit=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA: bitsandbytes' 4-bit kernels need CUDA")
def test_qlora_trains_adapters_over_a_4bit_base_and_merges_into_the_full_one(bert_dir, tmp_path):
    """On a CUDA machine (CI has none): the worker's model with --qlora has an NF4 base, its adapters learn
    co-engagement pairs, and the export path (a full-precision rebuild on CPU with the trained adapters,
    merged into a fresh base) embeds like the adapters it was given; the base folder is untouched."""
    bnb = pytest.importorskip("bitsandbytes")
    digest = weights_digest(bert_dir)
    cfg = tune_config.TuneConfig(teacher="minilm", teacher_path=str(bert_dir), lr=1e-2, logit_lr=0.1)
    config = {"tune": cfg.to_dict(), "adapter": tune_config.AdapterConfig(qlora=True).to_dict()}
    model = tune_model.build_model(config, device="cuda")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert any(p.dtype == torch.uint8 for p in model.parameters())  # the packed NF4 weights
    texts = [f"{g} {f}" for g in GROUPS for f in FILLERS]
    a = np.array([k for k in range(len(texts)) for _ in range(2)])
    b = np.array([(k // 6) * 6 + (k % 6 + 1 + j) % 6 for k in range(len(texts)) for j in range(2)])
    labels = torch.as_tensor(
        np.array([[k // 6] for k in a]) == np.array([[k // 6 for k in b]]), device="cuda"
    )

    def loss() -> torch.Tensor:
        x = model.teacher.text_features([texts[k] for k in a])
        y = model.teacher.text_features([texts[k] for k in b])
        return model.loss(x, y, labels)

    opt = torch.optim.AdamW([{**g, "lr": g.get("lr", cfg.lr)} for g in model.param_groups()], lr=cfg.lr)
    model.train()
    with torch.no_grad():
        start = float(loss())
    for _ in range(60):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        assert float(loss()) < 0.7 * start
    trained = {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    full = tune_model.build_model(config, qlora=False)  # what the driver does before exporting
    tune_loop._load_trainable(full, trained)
    tcfg = tune_config.teacher_config(cfg)
    tuned = tune_export._export_lora(tmp_path, full, tcfg, full.teacher.model_id)
    merged = load_teacher(TeacherConfig(name="minilm", path=str(tmp_path / "model")))
    with torch.inference_mode():
        np.testing.assert_allclose(
            merged.embed_texts(texts), full.teacher.text_features(texts).numpy(), atol=1e-4
        )
    assert "+lora@" in tuned["teacher_id"] and weights_digest(bert_dir) == digest


def test_bad_pairs_for_the_method_are_refused(world, bert_dir):
    ws, _, _ = world
    with pytest.raises(ValueError, match="text-only"):
        _tune(ws, "x", "--teacher-path", str(bert_dir), "--pairs", "image-title")
    with pytest.raises(ValueError, match="image-title pairs"):
        _tune(ws, "x", "--teacher-path", str(bert_dir), "--method", "lit", "--pairs", "co-engagement")
    with pytest.raises(ValueError, match="neither a teacher"):
        _tune(ws, "x", "--teacher", "no-such-teacher")


# ---------------------------------------------------------------------------------------------- image teachers


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> Path:
    """A tiny random SigLIP (text and vision towers) with a word tokenizer."""
    from transformers import SiglipConfig, SiglipModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    folder = tmp_path_factory.mktemp("tiny_siglip")
    n = _word_tokenizer(folder, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(vocab_size=n, max_position_embeddings=16, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    config = SiglipConfig(
        text_config={**text, **small}, vision_config=dict(image_size=32, patch_size=8, **small)
    )
    SiglipModel(config).save_pretrained(folder)
    return folder


CLIP_CONFIGURATION_PY = """
from transformers import CLIPConfig


class TinyJinaClipConfig(CLIPConfig):
    model_type = "tiny_jina_clip"
"""

# jina-clip-v2's interface on a tiny random CLIP: encode_* (numpy, normalised, then truncated) for embedding,
# get_text_features / get_image_features (CLIPModel's) for tuning.
CLIP_MODELING_PY = """
import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPModel

from .configuration_tiny_jina_clip import TinyJinaClipConfig


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class TinyJinaClipModel(CLIPModel):
    config_class = TinyJinaClipConfig

    def _finish(self, x, truncate_dim):
        x = F.normalize(_features(x), dim=-1)
        return (x[:, :truncate_dim] if truncate_dim else x).numpy()

    @torch.inference_mode()
    def encode_text(self, sentences, truncate_dim=None, **kwargs):
        tok = AutoTokenizer.from_pretrained(self.name_or_path)
        ids = tok(list(sentences), padding=True, truncation=True, return_tensors="pt")["input_ids"]
        return self._finish(self.get_text_features(input_ids=ids), truncate_dim)

    @torch.inference_mode()
    def encode_image(self, images, truncate_dim=None, **kwargs):
        size = (self.config.vision_config.image_size,) * 2
        px = np.stack([np.asarray(im.convert("RGB").resize(size), np.float32) / 255.0 for im in images])
        pixels = torch.from_numpy(px.transpose(0, 3, 1, 2).copy())
        return self._finish(self.get_image_features(pixel_values=pixels), truncate_dim)
"""


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP behind jina-clip-v2's remote-code interface (loaded with trust_remote_code)."""
    import sys

    folder = tmp_path_factory.mktemp(f"tiny_jina_clip_{uuid.uuid4().hex[:8]}", numbered=False)
    (folder / "configuration_tiny_jina_clip.py").write_text(textwrap.dedent(CLIP_CONFIGURATION_PY))
    (folder / "modeling_tiny_jina_clip.py").write_text(textwrap.dedent(CLIP_MODELING_PY))
    n = _word_tokenizer(folder, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = {
        "model_type": "tiny_jina_clip",
        "auto_map": {
            "AutoConfig": "configuration_tiny_jina_clip.TinyJinaClipConfig",
            "AutoModel": "modeling_tiny_jina_clip.TinyJinaClipModel",
        },
        "projection_dim": 24,
        "text_config": {**small, "vocab_size": n, "max_position_embeddings": 16, "eos_token_id": 2},
        "vision_config": {**small, "image_size": 32, "patch_size": 8},
    }
    (folder / "config.json").write_text(json.dumps(config))
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    AutoModel.from_config(
        AutoConfig.from_pretrained(folder, trust_remote_code=True), trust_remote_code=True
    ).save_pretrained(folder)
    assert "torchvision" not in sys.modules
    return folder


@pytest.mark.parametrize(
    ("teacher", "pairs"), [("siglip", "both"), ("jina-clip-v2", "image-title")], ids=["siglip", "clip"]
)
def test_image_teacher_lora_lowers_the_loss_and_merges(world, request, teacher, pairs, ray_local):
    from peft import PeftModel

    ws, _, titles = world
    folder = request.getfixturevalue("siglip_dir" if teacher == "siglip" else "clip_dir")
    digest = weights_digest(folder)
    flags = ["--teacher", teacher, "--teacher-path", str(folder), "--pairs", pairs, "--epochs", "2"]
    flags += ["--lr", "0.01", "--num-workers", "1", "--valid-fraction", "0.2", "--random-negatives", "4"]
    export_dir, info = _tune(ws, f"img-{teacher}", *flags)
    best = info["best"]
    assert best["val_loss"] < best["val_loss_start"]
    if pairs == "both":
        assert info["pairs"]["co_engagement_mined"] > 0 and info["pairs"]["image_title_mined"] == 24
    assert weights_digest(folder) == digest  # the base on disk is untouched
    # the merged export loads as the same kind of teacher and embeds texts AND images like base + adapter
    merged = load_teacher(TeacherConfig(name=teacher, path=str(export_dir / "model")))
    base = load_teacher(TeacherConfig(name=teacher, path=str(folder)))
    base.model = PeftModel.from_pretrained(base.model, export_dir / "adapter").eval()
    images = [Image.open(ws.data.parent.parent / "images" / f"{i}.png") for i in (100, 110, 120)]
    with torch.inference_mode():
        for fn in ("text_features", "image_features"):
            args = [list(titles.values())[:5]] if fn == "text_features" else [merged.pixel_values(images)]
            np.testing.assert_allclose(getattr(merged, fn)(*args), getattr(base, fn)(*args), atol=1e-5)
    assert merged.model_id == info["teacher_id"] and "+lora@" in merged.model_id
    assert merged.embed_images(images).shape == (3, merged.dim)  # the model's own encode_* path too


# ---------------------------------------------------------------------------------------------- LiT


@pytest.fixture(scope="module")
def lit(world, bert_dir, ray_local):
    ws, _, _ = world
    flags = [
        "--teacher",
        "minilm",
        "--teacher-path",
        str(bert_dir),
        "--method",
        "lit",
        "--pairs",
        "image-title",
    ]
    flags += [
        "--lit-hidden-size",
        "32",
        "--lit-num-layers",
        "1",
        "--lit-num-heads",
        "2",
        "--lit-patch-size",
        "8",
    ]
    flags += ["--lit-image-height", "16", "--lit-image-width", "16", "--epochs", "6", "--lr", "0.003"]
    flags += ["--valid-fraction", "0.3", "--batch-size", "8", "--num-workers", "1", "--random-negatives", "4"]
    return _tune(ws, "lit", *flags)


def test_lit_image_tower_lowers_the_loss_and_embeds_images(lit, world, bert_dir):
    export_dir, info = lit
    ws, groups, _ = world
    best = info["best"]
    assert best["val_loss"] < best["val_loss_start"]
    assert info["cost"]["trainable_params"] < info["cost"]["total_params"]  # the text tower is locked
    teacher = load_teacher(TeacherConfig(name="lit", path=str(export_dir / "model")))
    text = load_teacher(TeacherConfig(name="minilm", path=str(bert_dir)))
    assert teacher.supports_images and teacher.dim == text.dim
    assert teacher.model_id == info["teacher_id"] and teacher.model_id.startswith(f"lit:{text.model_id}+vit@")
    np.testing.assert_allclose(teacher.embed_texts(["apple red"]), text.embed_texts(["apple red"]), atol=1e-6)
    images = [Image.open(ws.data.parent.parent / "images" / f"{i}.png") for i in sorted(groups)]
    v = teacher.embed_images(images)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_embed_with_a_tuned_teacher_carries_its_id(lit, tuned_text, world, capsys):
    from vlmrec.cli import main

    ws, _, _ = world
    for export_dir, info in (lit, tuned_text[:2]):
        assert (
            main(["embed", "--workdir", str(ws.root), "--teacher", str(export_dir), "--batch-size", "8"]) == 0
        )
        table = pq.read_table(ws.embeddings).to_pandas()
        assert set(table["teacher_id"]) == {info["teacher_id"]} and len(table) == 24
    assert "text fallback 0" in capsys.readouterr().out  # lit: every item got its image fused in


# ---------------------------------------------------------------------------------------------- teacher ids


def test_training_refuses_a_run_started_on_another_teacher(sample_workspace, capsys):
    from vlmrec.cli import main

    ws = sample_workspace
    run = ws.runs / "other-teacher"
    run.mkdir(parents=True, exist_ok=True)
    (run / "teacher.json").write_text(json.dumps({"teacher_id": "minilm:something-else@000000000000"}))
    argv = ["train", "--workdir", str(ws.root), "--name", "other-teacher", "--epochs", "1", "--max-len", "8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "teacher mismatch" in err and "something-else" in err and "--name" in err


def test_index_build_refuses_vectors_of_another_teacher(tmp_path, capsys):
    from index.cli import main
    from vlmrec import schema
    from vlmrec.workspace import atomic_write_parquet

    ws = Workspace(tmp_path / "ws").ensure()
    ids = np.arange(1, 6)
    items = pd.DataFrame({"item_id": ids, "title": [f"t{i}" for i in ids], "category": "c", "created_at": T0})
    items.to_parquet(ws.items)
    vec = np.eye(5, 4, dtype=np.float32) + 0.1
    frame = pd.DataFrame({"item_id": ids, "event_timestamp": T0, "vector": list(vec), "teacher_id": "tuned"})
    import pyarrow as pa

    atomic_write_parquet(
        pa.Table.from_pandas(frame, preserve_index=False).cast(schema.ITEM_EMBEDDINGS), ws.embeddings
    )
    export = tmp_path / "item_vectors.parquet"
    frame.assign(teacher_id="frozen").drop(columns="event_timestamp").to_parquet(export)
    assert main(["build", "--workdir", str(ws.root), "--vectors", str(export)]) == 2
    err = capsys.readouterr().err
    assert "teacher mismatch" in err and "'frozen'" in err and "'tuned'" in err
    frame.drop(columns="event_timestamp").to_parquet(export)  # the same teacher: builds
    assert main(["build", "--workdir", str(ws.root), "--vectors", str(export)]) == 0


def test_producer_refuses_an_export_whose_files_disagree(tmp_path):
    from serving.loading import check_export_teacher

    (tmp_path / "run.json").write_text(json.dumps({"teacher_id": "minilm:a@1"}))
    vectors = pd.DataFrame({"item_id": [1, 2], "vector": [[1.0, 0.0]] * 2, "teacher_id": "minilm:a@1"})
    vectors.to_parquet(tmp_path / "item_vectors.parquet")
    check_export_teacher(tmp_path, {"teacher_id": "minilm:a@1"})
    vectors.assign(teacher_id="minilm:a@1+lora@2").to_parquet(tmp_path / "item_vectors.parquet")
    with pytest.raises(ValueError, match="teacher mismatch"):
        check_export_teacher(tmp_path, {"teacher_id": "minilm:a@1"})
