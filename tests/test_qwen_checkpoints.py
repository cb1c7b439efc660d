"""Real Qwen-VL checkpoints load through ``model.preset: pretrained`` (the GPU user's path).

For each family a tiny random checkpoint is written the way the official Hugging Face repositories
look on disk (Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen3-VL-8B-Instruct),
only small:

* config.json as upstream: ``architectures`` = the real *ForConditionalGeneration class, the
  upstream model_type; Qwen2-VL / Qwen2.5-VL in their flat legacy form (text keys at the top level,
  ``rope_scaling: {type: mrope}``, ``in_chans``), Qwen3-VL nested (text_config / vision_config,
  interleaved M-RoPE, DeepStack, vision model_type "qwen3_vl" as in the hub files);
* model.safetensors in bfloat16 written by the *ForConditionalGeneration's save_pretrained, whose
  keys are the hub's: ``model.layers.*`` / ``visual.*`` / ``lm_head.weight`` for Qwen2(.5)-VL,
  ``model.language_model.*`` / ``model.visual.*`` / ``lm_head.weight`` for Qwen3-VL;
* a byte-level BPE tokenizer (trained offline) built like Qwen's (NFC, the Qwen2 split regex, the
  special tokens appended after the BPE vocabulary, config vocab padded past the tokenizer), saved
  as tokenizer.json + vocab.json + merges.txt + tokenizer_config.json (tokenizer_class
  Qwen2Tokenizer, the Qwen-VL chat template) + chat_template.json;
* preprocessor_config.json as upstream (Qwen2-VL: min/max_pixels, CLIP mean/std, patch 14;
  Qwen3-VL: size.shortest/longest_edge, mean/std 0.5, patch 16), generation_config.json.

Then: load via MLLMEmbedder.from_params(preset pretrained), check every weight arrived, embed,
save/reload, and build + run a reranker from the saved embedder.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageDraw

from core.config import load_params
from training.backbone import EMB_TOKEN, SYSTEM_PROMPT, MLLMEmbedder

QWEN_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
              r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# the added tokens of Qwen2-VL's tokenizer, in their order (151643..151656 upstream), then two of the
# non-special ones Qwen2.5 added after them
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_PLAIN_ADDED = ["<tool_call>", "</tool_call>"]
# the Qwen2-VL chat template (Qwen2.5-VL and Qwen3-VL ship the same structure)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [f"{c} {k} number {i}: a product photo, with text and punctuation!" for i, (c, k) in enumerate(
    (c, k) for c in ("red", "blue", "green", "yellow", "black") for k in ("chair", "car toy", "apple", "lamp"))]
CORPUS += ["system user assistant You are a relevance embedding generator Input Text: Input Image:"] * 5

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

FAMILIES = {
    # family: (architecture, base-model class, patch size, hub key of the text embeddings)
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLModel", 14, "model.embed_tokens.weight"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel", 14, "model.embed_tokens.weight"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLModel", 16, "model.language_model.embed_tokens.weight"),
}


def _img(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    w, h = size
    for _ in range(3):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        d.rectangle([x0, y0, x0 + w // 3, y0 + h // 3], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return im


# ------------------------------------------------------------------------------ writing a hub repo

def _write_tokenizer(d: Path, padding_side: str) -> dict[str, int]:
    """A Qwen-style byte-level BPE: the special tokens come after the BPE vocabulary, as upstream."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                            processors, trainers)

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    n_bpe = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_PLAIN_ADDED])
    tok.save(str(d / "tokenizer.json"))
    tok.model.save(str(d))                                   # vocab.json + merges.txt, as upstream
    vocab = tok.get_vocab()
    assert vocab["<|endoftext|>"] == n_bpe                   # appended, like 151643 upstream
    decoder = {str(vocab[t]): dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False,
                                   special=t in QWEN_SPECIALS) for t in QWEN_SPECIALS + QWEN_PLAIN_ADDED}
    (d / "tokenizer_config.json").write_text(json.dumps(dict(
        add_prefix_space=False, added_tokens_decoder=decoder,
        additional_special_tokens=QWEN_SPECIALS[1:], bos_token=None, chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, eos_token="<|im_end|>", errors="replace", model_max_length=32768,
        pad_token="<|endoftext|>", padding_side=padding_side, split_special_tokens=False,
        tokenizer_class="Qwen2Tokenizer", unk_token=None), indent=2))
    (d / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    return vocab


def _hub_config(family: str, vocab: dict[str, int], vocab_size: int, tie: bool) -> dict:
    ids = dict(bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"])
    mm = dict(vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
              image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"])
    if family in ("qwen2_vl", "qwen2_5_vl"):       # the flat legacy form of the hub's config.json
        arch = FAMILIES[family][0]
        if family == "qwen2_vl":
            vision = dict(depth=2, embed_dim=32, mlp_ratio=4, num_heads=2, in_chans=3, hidden_size=HIDDEN,
                          patch_size=14, spatial_merge_size=2, spatial_patch_size=14, temporal_patch_size=2)
        else:
            vision = dict(depth=2, hidden_act="silu", hidden_size=32, intermediate_size=64, num_heads=2, in_chans=3,
                          out_hidden_size=HIDDEN, patch_size=14, spatial_merge_size=2, spatial_patch_size=14,
                          window_size=112, fullatt_block_indexes=[1], tokens_per_second=2, temporal_patch_size=2)
        return dict(architectures=[arch], attention_dropout=0.0, **ids, **mm,
                    vision_token_id=vocab["<|vision_pad|>"], hidden_act="silu", hidden_size=HIDDEN,
                    initializer_range=0.02, intermediate_size=128, max_position_embeddings=32768,
                    max_window_layers=2, model_type=family, num_attention_heads=HEADS, num_hidden_layers=2,
                    num_key_value_heads=KV_HEADS, rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768,
                    tie_word_embeddings=tie, torch_dtype="bfloat16", transformers_version="4.41.2",
                    use_cache=True, use_sliding_window=False, vision_config=vision,
                    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},   # 16/24/24 at head_dim 128
                    vocab_size=vocab_size)
    text = dict(attention_bias=False, attention_dropout=0.0, **ids, dtype="bfloat16", head_dim=HEAD_DIM,
                hidden_act="silu", hidden_size=HIDDEN, initializer_range=0.02, intermediate_size=128,
                max_position_embeddings=262144, model_type="qwen3_vl_text", num_attention_heads=HEADS,
                num_hidden_layers=2, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-6,
                rope_scaling={"mrope_interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"},
                rope_theta=5000000, use_cache=True, vocab_size=vocab_size)
    vision = dict(deepstack_visual_indexes=[0, 1], depth=2, hidden_act="gelu_pytorch_tanh", hidden_size=32,
                  in_channels=3, initializer_range=0.02, intermediate_size=64, model_type="qwen3_vl", num_heads=2,
                  num_position_embeddings=2304, out_hidden_size=HIDDEN, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2)
    return dict(architectures=["Qwen3VLForConditionalGeneration"], model_type="qwen3_vl", text_config=text,
                tie_word_embeddings=tie, transformers_version="4.57.0.dev0", vision_config=vision, **mm)


def _preprocessor_config(family: str) -> dict:
    if family == "qwen3_vl":
        return {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
                "image_processor_type": "Qwen2VLImageProcessorFast"}
    return {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor" if family == "qwen2_vl" else "Qwen2_5_VLProcessor"}


def write_hub_checkpoint(d: Path, family: str, tie: bool = False, pad_vocab: bool = True, seed: int = 0) -> Path:
    """A tiny random checkpoint in the official repository layout (see the module docstring)."""
    d.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer(d, padding_side="left" if family == "qwen2_vl" else "right")
    n = len(vocab)
    # upstream pads the embedding matrix past the tokenizer (151936 rows for 151665 tokens)
    vocab_size = -(-(n + 1) // 64) * 64 if pad_vocab else n
    config = _hub_config(family, vocab, vocab_size, tie)
    (d / "config.json").write_text(json.dumps(config, indent=2))
    cfg = transformers.AutoConfig.from_pretrained(d, local_files_only=True)
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family][0])(cfg).to(torch.bfloat16)
    model.save_pretrained(d)                                 # model.safetensors (+ its own config.json)
    (d / "config.json").write_text(json.dumps(config, indent=2))   # keep the hub's own form
    (d / "generation_config.json").write_text(json.dumps(dict(
        bos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], do_sample=True,
        eos_token_id=[vocab["<|im_end|>"], vocab["<|endoftext|>"]], repetition_penalty=1.05, temperature=0.1,
        top_k=1, top_p=0.001, transformers_version="4.41.2"), indent=2))
    (d / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(family), indent=2))
    return d


def _hub_tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(d / "model.safetensors"))


def _base_key(family: str, key: str) -> str | None:
    """The base model's (Qwen*VLModel's) parameter name of a hub key; None for lm_head."""
    if key.startswith("lm_head."):
        return None
    if family == "qwen3_vl":
        return key.removeprefix("model.")                   # model.language_model.* / model.visual.*
    if key.startswith("visual."):
        return key
    return "language_model." + key.removeprefix("model.")  # model.layers.* -> language_model.layers.*


# -------------------------------------------------------------------------------------- fixtures

def _have(family: str) -> bool:
    return hasattr(transformers, FAMILIES[family][1])


PARAMS = [pytest.param(f, marks=pytest.mark.skipif(not _have(f), reason=(
    f"transformers {transformers.__version__} lacks {FAMILIES[f][1]}"))) for f in FAMILIES]


@pytest.fixture(scope="module")
def mp() -> dict:
    # the user's params: only preset and pretrained change; family stays the default (qwen2_vl): the
    # checkpoint's config.json decides
    return load_params("tiny")["model"]


@pytest.fixture(scope="module", params=PARAMS)
def hub(request, tmp_path_factory) -> tuple[str, Path]:
    family = request.param
    return family, write_hub_checkpoint(tmp_path_factory.mktemp(family) / "hub", family)


@pytest.fixture(scope="module")
def loaded(hub, mp) -> MLLMEmbedder:
    _, d = hub
    return MLLMEmbedder.from_params(dict(mp, preset="pretrained", pretrained=str(d)), titles=[]).eval()


INPUTS = ([_img(0), None, _img(1, (150, 100))], [None, "red chair number 3", "blue lamp"])


# ------------------------------------------------------------------------------------------- tests

def test_hub_layout_on_disk(hub):
    """What the tests load is what the hub serves: real architecture names and key prefixes."""
    family, d = hub
    arch, _, patch, embed_key = FAMILIES[family]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json",
            "merges.txt", "chat_template.json", "preprocessor_config.json",
            "generation_config.json"} <= {p.name for p in d.iterdir()}
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == [arch] and cfg["model_type"] == family
    assert ("text_config" in cfg) == (family == "qwen3_vl")      # Qwen2(.5)-VL hub configs are flat
    keys = _hub_tensors(d)
    assert embed_key in keys and "lm_head.weight" in keys
    assert ("model.visual.patch_embed.proj.weight" if family == "qwen3_vl" else "visual.patch_embed.proj.weight") in keys
    assert all(t.dtype == torch.bfloat16 for t in keys.values())
    assert json.loads((d / "preprocessor_config.json").read_text())["patch_size"] == patch


def test_loads_every_weight_and_adds_emb(hub, loaded):
    family, d = hub
    assert loaded.family.name == family and loaded.preset == "pretrained"
    assert type(loaded.model).__name__ == FAMILIES[family][1]
    assert next(loaded.model.parameters()).dtype == torch.float32 and not loaded.training
    assert loaded.image_processor.patch_size == FAMILIES[family][2]
    # the hub config's legacy/nested rope keys were read, not defaulted
    hub_cfg = json.loads((d / "config.json").read_text())
    hub_rope = (hub_cfg.get("text_config") or hub_cfg)["rope_scaling"]
    rope = loaded.model.config.text_config.rope_parameters
    assert rope["mrope_section"] == hub_rope["mrope_section"]
    assert bool(rope.get("mrope_interleaved")) == (family == "qwen3_vl")
    if family == "qwen3_vl":
        assert loaded.model.config.vision_config.deepstack_visual_indexes == [0, 1]
    # every tensor of the checkpoint arrived (not a silent random init), the <|EMB|> row aside
    params = dict(loaded.model.named_parameters())
    emb_id = loaded.emb_token_id
    tensors = _hub_tensors(d)
    base = {_base_key(family, k): v for k, v in tensors.items() if _base_key(family, k)}
    assert set(base) == set(params), set(base) ^ set(params)
    for k, v in base.items():
        got = params[k].detach()
        if k.endswith("embed_tokens.weight"):
            assert got.shape == v.shape                           # padded vocab: no resize needed
            keep = torch.ones(v.shape[0], dtype=torch.bool)
            keep[emb_id] = False
            got, v = got[keep], v[keep]
        assert torch.equal(got, v.float()), k
    # <|EMB|> was added after Qwen's own tokens, one id, its row the mean of the rows before it
    tok = loaded.tokenizer
    assert EMB_TOKEN in tok.get_vocab() and emb_id == len(tok) - 1
    assert tok(EMB_TOKEN, add_special_tokens=False)["input_ids"] == [emb_id]
    table = params["language_model.embed_tokens.weight"].detach()
    assert torch.allclose(table[emb_id], table[:emb_id].mean(0), atol=1e-6)
    for s in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>"):
        assert len(tok(s, add_special_tokens=False)["input_ids"]) == 1
    assert loaded.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert loaded.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")


def test_prompt_is_the_chat_template(loaded):
    """The embedder's prompt is the checkpoint's own chat format (system, user, assistant turn)."""
    text = "red chair number 3"
    b = loaded.prepare(None, [text])
    got = loaded.tokenizer.decode(b["input_ids"][0].tolist(), skip_special_tokens=False)
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": [{"type": "text", "text": f"Input Text: {text}"}]}]
    want = loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert got == want + EMB_TOKEN
    im = loaded.prepare([_img(0)], None)
    n = int((im["input_ids"][0] == loaded.image_token_id).sum())
    got = loaded.tokenizer.decode(im["input_ids"][0].tolist(), skip_special_tokens=False)
    messages[1]["content"] = [{"type": "text", "text": "Input Image: "}, {"type": "image"}]
    want = loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert got == want.replace("<|image_pad|>", "<|image_pad|>" * n) + EMB_TOKEN


def test_embeds_image_text_and_both(loaded):
    images, texts = INPUTS
    emb = loaded.encode(images, texts)
    assert emb.shape == (3, HIDDEN) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(emb, loaded.encode(images, texts))                       # deterministic
    one = np.concatenate([loaded.encode([im], [t]) for im, t in zip(images, texts)])
    assert np.allclose(one, emb, atol=1e-4)                                        # batching/padding-free
    assert np.abs(emb[0] - emb[2]).max() > 1e-3 and np.abs(emb[1] - emb[2]).max() > 1e-3


def test_save_pretrained_roundtrip(hub, loaded, mp, tmp_path_factory):
    family, _ = hub
    out = tmp_path_factory.mktemp(f"{family}_saved") / "embedder"
    loaded.save_pretrained(out)
    settings = json.loads((out / "mllm2vec.json").read_text())
    assert settings["family"] == family and settings["dim"] == HIDDEN
    again = MLLMEmbedder.from_params(dict(mp, preset="pretrained", pretrained=str(out)), titles=[])
    assert again.family.name == family and again.emb_token_id == loaded.emb_token_id
    assert len(again.tokenizer) == len(loaded.tokenizer)                          # <|EMB|> not added twice
    images, texts = INPUTS
    assert np.array_equal(again.encode(images, texts), loaded.encode(images, texts))


def test_reranker_from_saved_embedder(hub, loaded, tmp_path_factory):
    from training.reranker import LM_CLASSES, MLLMReranker

    family, _ = hub
    assert LM_CLASSES[family] == FAMILIES[family][0]
    saved = tmp_path_factory.mktemp(f"{family}_emb") / "embedder"
    loaded.save_pretrained(saved)
    rr = MLLMReranker.from_embedder(saved, scorer_hidden=16)
    assert type(rr.lm).__name__ == FAMILIES[family][0] and rr.family.name == family
    q = (_img(0), "red chair", None)
    cands = [(_img(1), "red chair number 1", None), (None, "blue lamp", None), (_img(2, (90, 120)), None, None)]
    torch.manual_seed(0)
    out = rr.score([q], [cands])
    assert len(out) == 1 and out[0]["s"].shape == (3,) and np.isfinite(out[0]["s"]).all()
    assert np.isfinite(out[0]["s_null"]) and ((out[0]["r"] >= 0) & (out[0]["r"] <= 1)).all()
    back = tmp_path_factory.mktemp(f"{family}_rr") / "reranker"
    rr.save_pretrained(back)
    again = MLLMReranker.from_pretrained(back).score([q], [cands])
    assert np.allclose(again[0]["s"], out[0]["s"], atol=1e-5) and np.allclose(again[0]["r"], out[0]["r"], atol=1e-6)


def test_tied_2b_checkpoint_with_full_vocab(tmp_path, mp):
    """The 2B layout: tied word embeddings (no lm_head.weight on disk) and, here, no spare embedding
    row, so <|EMB|> makes the table grow by one."""
    d = write_hub_checkpoint(tmp_path / "hub2b", "qwen2_vl", tie=True, pad_vocab=False, seed=1)
    tensors = _hub_tensors(d)
    assert "lm_head.weight" not in tensors
    n = tensors["model.embed_tokens.weight"].shape[0]
    m = MLLMEmbedder.from_params(dict(mp, preset="pretrained", pretrained=str(d)), titles=[])
    table = m.model.get_input_embeddings().weight
    assert table.shape[0] == n + 1 and m.emb_token_id == n
    assert torch.equal(table[:n].detach(), tensors["model.embed_tokens.weight"].float())
    emb = m.encode(*INPUTS)
    assert emb.shape == (3, HIDDEN) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    out = tmp_path / "saved"
    m.save_pretrained(out)
    assert np.array_equal(MLLMEmbedder.from_pretrained(out).encode(*INPUTS), emb)


@pytest.mark.skipif(not _have("qwen3_vl"), reason=f"transformers {transformers.__version__} lacks Qwen3VLModel")
def test_pixel_budget_override_keeps_the_checkpoints_normalisation(tmp_path, mp):
    """presets.pretrained.{min,max}_pixels (how a GPU user bounds the image size) changes the size
    only: Qwen3-VL's mean/std 0.5 and patch 16 stay."""
    d = write_hub_checkpoint(tmp_path / "hub3", "qwen3_vl")
    over = dict(mp, preset="pretrained", pretrained=str(d),
                presets=dict(mp["presets"], pretrained={"min_pixels": 4096, "max_pixels": 16384}))
    m = MLLMEmbedder.from_params(over, titles=[])
    ip = m.image_processor
    assert ip.size["shortest_edge"] == 4096 and ip.size["longest_edge"] == 16384
    assert ip.patch_size == 16 and list(ip.image_mean) == [0.5, 0.5, 0.5] and list(ip.image_std) == [0.5, 0.5, 0.5]
    b = m.prepare([_img(0, (400, 400))], None)
    assert int(b["image_grid_thw"].prod(-1)) * 16 * 16 <= 16384


@pytest.mark.skipif(not _have("qwen3_vl"), reason=f"transformers {transformers.__version__} lacks Qwen3VLModel")
def test_qwen3_vl_preset_and_deepstack(mp):
    """The qwen3_vl family also builds from a preset (random init) and its forward feeds DeepStack:
    the vision blocks' merged features reach the decoder at the image tokens."""
    from training.backbone import _qwen3_mrope_section

    assert _qwen3_mrope_section(128) == [24, 20, 20] and _qwen3_mrope_section(16) == [4, 2, 2]
    tiny = dict(mp["presets"]["tiny"], patch_size=16, min_pixels=4096, max_pixels=4096)
    torch.manual_seed(0)
    m = MLLMEmbedder.from_params(dict(mp, family="qwen3_vl", preset="tiny", presets={"tiny": tiny}),
                                 [t for t in CORPUS]).eval()
    cfg = m.model.config
    assert type(m.model).__name__ == "Qwen3VLModel" and cfg.vision_config.patch_size == 16
    assert cfg.text_config.head_dim == HIDDEN // mp["presets"]["tiny"]["heads"]
    assert cfg.vision_config.deepstack_visual_indexes == [0]           # depth 2
    emb = m.encode(*INPUTS)
    assert emb.shape == (3, HIDDEN) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        for merger in m.model.visual.deepstack_merger_list:
            for prm in merger.parameters():
                prm.zero_()
    off = m.encode(*INPUTS)
    assert np.abs(off[[0, 2]] - emb[[0, 2]]).max() > 1e-4          # images: DeepStack mattered
    assert np.allclose(off[1], emb[1], atol=1e-6)                   # text only: untouched
