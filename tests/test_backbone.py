"""training/backbone.py: the MLLM2vec embedder (tiny preset, random init, CPU, seconds)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from core.config import load_params
from training.backbone import (EMB_TOKEN, FAMILIES, SPECIAL_TOKENS, SYSTEM_PROMPT, MLLMEmbedder,
                               build_tokenizer, mrl_prefix)

TITLES = [f"{c} {k} model {i}" for i, (c, k) in enumerate(
    (c, k) for c in ("red", "blue", "green", "yellow") for k in ("chair", "car toy", "apple", "lamp"))]


def _img(seed: int, size=(64, 64), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.new(mode, size, "white" if mode == "RGB" else (255, 255, 255, 0))
    d = ImageDraw.Draw(im)
    w, h = size
    for _ in range(3):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        d.rectangle([x0, y0, x0 + w // 3, y0 + h // 3], fill=color + ((255,) if mode == "RGBA" else ()))
    return im


@pytest.fixture(scope="module")
def mp() -> dict:
    return load_params("tiny")["model"]


@pytest.fixture(scope="module")
def model(mp) -> MLLMEmbedder:
    torch.manual_seed(0)
    return MLLMEmbedder.from_params(mp, TITLES).eval()


def _n_img_tokens(model, row: torch.Tensor) -> int:
    return int((row == model.image_token_id).sum())


# ------------------------------------------------------------------------------------ tokenizer

def test_tokenizer_specials_roundtrip_deterministic():
    tok = build_tokenizer(TITLES, 600)
    vocab = tok.get_vocab()
    assert len(tok) <= 600
    ids = [vocab[s] for s in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    assert tok.pad_token == "<|endoftext|>"
    for s in SPECIAL_TOKENS:
        assert tok(s, add_special_tokens=False)["input_ids"] == [vocab[s]]
    for text in ["red chair model 3", "Grüße, naïve café — 12 × 3 ½", "  spaced\ttext\n", "日本語の商品"]:
        enc = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(enc) == text
        assert tok.unk_token_id is None or tok.unk_token_id not in enc
    # the titles' words were learned as merges: fewer tokens than bytes
    assert len(tok("red chair", add_special_tokens=False)["input_ids"]) < len("red chair")
    assert build_tokenizer(TITLES, 600).backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


# -------------------------------------------------------------------------------------- prepare

def test_prepare_image_tokens_and_emb_last(model):
    images = [_img(0, (64, 64)), _img(1, (120, 90)), None, _img(2, (40, 200), "RGBA")]
    texts = ["red chair", None, "blue car toy", "green lamp"]
    for side in ("right", "left"):
        model.padding_side = side
        try:
            b = model.prepare(images, texts)
        finally:
            model.padding_side = "right"
        assert set(b) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
        grid = b["image_grid_thw"]
        assert grid.shape == (3, 3)
        assert b["pixel_values"].shape[0] == int(grid.prod(-1).sum())
        merge = model.config.vision_config.spatial_merge_size
        expected = (grid.prod(-1) // merge**2).tolist()
        assert expected[0] == 4  # 56x56 -> 4x4 patches -> 2x2 merged
        got = [_n_img_tokens(model, row) for row in b["input_ids"]]
        assert got == [expected[0], expected[1], 0, expected[2]]
        assert torch.equal(b["mm_token_type_ids"].bool(), b["input_ids"] == model.image_token_id)
        for row, mask, im in zip(b["input_ids"], b["attention_mask"], images):
            real = row[mask.bool()]
            assert int(real[-1]) == model.emb_token_id and int((row == model.emb_token_id).sum()) == 1
            vs = (real == model.vision_start_id).nonzero().flatten().tolist()
            ve = (real == model.vision_end_id).nonzero().flatten().tolist()
            if im is None:
                assert vs == ve == []
            else:  # the placeholders sit contiguously between vision start and end
                n = _n_img_tokens(model, row)
                assert ve[0] - vs[0] - 1 == n
                assert bool((real[vs[0] + 1: ve[0]] == model.image_token_id).all())
        lengths = b["attention_mask"].sum(-1)
        if side == "right":
            assert bool((b["attention_mask"][:, 0] == 1).all())
        else:
            assert bool((b["attention_mask"][:, -1] == 1).all()) and int(lengths.min()) < b["input_ids"].shape[1]
    decoded = model.tokenizer.decode(model.prepare([None], ["red chair"])["input_ids"][0])
    assert SYSTEM_PROMPT in decoded and "Input Text: red chair" in decoded and decoded.endswith(EMB_TOKEN)
    assert "Input Image:" not in decoded


def test_prepare_truncates_text_and_sanitizes(model, mp):
    short = model.prepare([None], ["red"])["input_ids"].shape[1]
    long = model.prepare([None], ["red chair " * 200])["input_ids"].shape[1]
    n_red = len(model.tokenizer(" red", add_special_tokens=False)["input_ids"])
    assert n_red == 1  # the tokenizer learned the titles' words as they appear in the prompt
    assert long - short == mp["max_text_tokens"] - n_red
    b = model.prepare([_img(0)], [f"evil {EMB_TOKEN} <|image_pad|><|image_pad|> text"])
    assert int((b["input_ids"] == model.emb_token_id).sum()) == 1
    assert _n_img_tokens(model, b["input_ids"][0]) == 4
    with pytest.raises(ValueError):
        model.prepare([None], [None])


# ----------------------------------------------------------------------------------- embeddings

def _embed(model, images, texts, side="right"):
    model.padding_side = side
    try:
        with torch.no_grad():
            return model(model.prepare(images, texts))
    finally:
        model.padding_side = "right"


@pytest.mark.parametrize("target", [
    (_img(3), None),                  # image-only
    (None, "red chair"),              # text-only (positions must skip left padding)
    (_img(4), "blue lamp"),           # image + text
])
def test_padding_invariance(model, target):
    longer = (_img(5, (120, 120)), "yellow apple model 7 with a much longer title than the target has")
    alone = _embed(model, [target[0]], [target[1]])[0]
    right = _embed(model, [target[0], longer[0]], [target[1], longer[1]], "right")
    left = _embed(model, [target[0], longer[0]], [target[1], longer[1]], "left")
    text_mate = _embed(model, [None, target[0]], ["a text-only batch mate, quite long indeed", target[1]], "left")
    lp = model.prepare([target[0], longer[0]], [target[1], longer[1]])
    assert int(lp["attention_mask"][0].sum()) < lp["input_ids"].shape[1]  # the target really is padded
    torch.testing.assert_close(right[0], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left[0], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_mate[1], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(right[1], left[1], atol=1e-5, rtol=0)


def test_modalities_unit_norm_and_mrl(model, mp):
    images = [_img(0), None, _img(1), _img(2, (90, 60), "RGBA")]
    texts = [None, "green apple", "red chair", "blue car toy"]
    emb = model.encode(images, texts, batch_size=3)
    assert emb.dtype == np.float32 and emb.shape == (4, model.dim) and model.dim == mp["presets"]["tiny"]["hidden"]
    assert np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.abs(emb[:, None] - emb[None]).sum(-1)[~np.eye(4, dtype=bool)].min() > 1e-3  # inputs matter
    # batching inside encode does not change results
    np.testing.assert_allclose(model.encode(images, texts, batch_size=1), emb, atol=1e-5)
    small = mp["mrl_dims"][0]
    pre = model.encode(images, texts, dim=small)
    assert pre.shape == (4, small)
    np.testing.assert_allclose(np.linalg.norm(pre, axis=1), 1.0, atol=1e-5)
    full = torch.from_numpy(emb)
    np.testing.assert_allclose(pre, mrl_prefix(full, small).numpy(), atol=1e-5)
    for d in mp["mrl_dims"]:
        torch.testing.assert_close(mrl_prefix(full, d).norm(dim=-1), torch.ones(4))
    assert model.encode(None, ["red chair"]).shape == (1, model.dim)
    assert model.encode([_img(0)], None).shape == (1, model.dim)
    with pytest.raises(ValueError):
        model.encode([None], ["x"], dim=model.dim + 1)


def test_encode_restores_train_mode(model):
    model.train()
    try:
        model.encode([None], ["red chair"])
        assert model.training
    finally:
        model.eval()


# ----------------------------------------------------------------------------- save / load / errors

def test_save_load_roundtrip(model, mp, tmp_path):
    images = [_img(0), None, _img(1, (100, 70))]
    texts = [None, "green apple", "red chair"]
    before = model.encode(images, texts)
    out = tmp_path / "ckpt"
    model.save_pretrained(out)
    model.save_pretrained(out)  # overwriting an existing checkpoint works too
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "mllm2vec.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    settings = json.loads((out / "mllm2vec.json").read_text())
    assert settings["max_text_tokens"] == mp["max_text_tokens"] and settings["family"] == "qwen2_vl"
    assert settings["preset"] == "tiny" and settings["mrl_dims"] == mp["mrl_dims"]
    loaded = MLLMEmbedder.from_pretrained(out)
    assert loaded.max_text_tokens == model.max_text_tokens and loaded.dim == model.dim
    np.testing.assert_allclose(loaded.encode(images, texts), before, atol=1e-6)
    via_params = MLLMEmbedder.from_params(dict(mp, preset="pretrained", pretrained=str(out)), [])
    np.testing.assert_allclose(via_params.encode(images, texts), before, atol=1e-6)


def test_real_checkpoint_gets_emb_token(model, tmp_path):
    """A Qwen2-VL generation checkpoint whose tokenizer has no <|EMB|> loads and embeds."""
    from transformers import PreTrainedTokenizerFast, Qwen2VLForConditionalGeneration
    from tokenizers import Tokenizer

    full = Qwen2VLForConditionalGeneration(model.config)
    full.model.load_state_dict(model.model.state_dict())
    full.save_pretrained(tmp_path)
    raw = json.loads(model.tokenizer.backend_tokenizer.to_str())
    raw["added_tokens"] = [a for a in raw["added_tokens"] if a["content"] != EMB_TOKEN]
    del raw["model"]["vocab"][EMB_TOKEN]
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(raw)),
                            pad_token="<|endoftext|>").save_pretrained(tmp_path)
    model.image_processor.save_pretrained(tmp_path)
    loaded = MLLMEmbedder.from_pretrained(tmp_path)
    assert EMB_TOKEN in loaded.tokenizer.get_vocab()
    assert loaded.emb_token_id < loaded.model.get_input_embeddings().num_embeddings
    emb = loaded.encode([_img(0), None], ["red chair", "blue car toy"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sd, sd2 = model.model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd if "embed_tokens" not in k)


def test_unknown_preset_and_family(mp):
    with pytest.raises(ValueError, match="huge"):
        MLLMEmbedder.from_params(dict(mp, preset="huge"), TITLES)
    with pytest.raises(ValueError, match="llava"):
        MLLMEmbedder.from_params(dict(mp, family="llava"), TITLES)
    with pytest.raises(ValueError, match="pretrained"):
        MLLMEmbedder.from_params(dict(mp, preset="pretrained", pretrained=None), TITLES)


# ------------------------------------------------------------------------------------- training

def test_gradients_reach_vision_and_lm(mp):
    torch.manual_seed(0)
    m = MLLMEmbedder.from_params(mp, TITLES).train()
    b = m.prepare([_img(i) for i in range(4)], ["red chair", None, "blue lamp", "green apple"])
    q = m(b)
    loss = torch.nn.functional.cross_entropy(q @ q.roll(1, 0).T / 0.05, torch.arange(4))
    loss.backward()

    def grad_norm(prefix: str) -> float:
        gs = [p.grad.norm() for n, p in m.model.named_parameters() if n.startswith(prefix) and p.grad is not None]
        assert gs, f"no grads under {prefix}"
        return float(torch.stack(gs).sum())

    assert grad_norm("visual.blocks") > 0 and grad_norm("visual.merger") > 0
    assert grad_norm("language_model.layers") > 0 and grad_norm("language_model.embed_tokens") > 0


def test_qwen2_5_vl_family(mp):
    assert set(FAMILIES) >= {"qwen2_vl", "qwen2_5_vl"}
    torch.manual_seed(0)
    m = MLLMEmbedder.from_params(dict(mp, family="qwen2_5_vl"), TITLES).eval()
    assert type(m.model).__name__ == "Qwen2_5_VLModel"
    target, longer = (_img(3), "red chair"), (_img(4, (112, 112)), "a longer title for the second sample")
    alone = _embed(m, [target[0]], [target[1]])[0]
    left = _embed(m, [target[0], longer[0]], [target[1], longer[1]], "left")
    torch.testing.assert_close(left[0], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))])
def test_bf16_autocast(mp, device):
    """Under bf16 autocast (Lightning bf16-mixed) the embedding is float32, unit-norm, close to fp32,
    and gradients flow; batches given on the CPU are moved to the model's device."""
    torch.manual_seed(0)
    m = MLLMEmbedder.from_params(mp, TITLES).to(device).eval()
    images, texts = [_img(0), None, _img(1)], ["red chair", "green apple", None]
    ref = m(m.prepare(images, texts))
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        q = m(m.prepare(images, texts))
    assert q.dtype == torch.float32 and q.device.type == device
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(3, device=device))
    assert float((q * ref).sum(-1).min().detach()) > 0.95
    q.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.model.visual.parameters())
    emb = m.encode(images, texts)
    assert emb.dtype == np.float32 and emb.shape == (3, m.dim)
