"""What trains in a pretrained backbone (params `model.finetune`): LoRA adapters on the decoder
(peft), the projector in full, the vision tower only when unfrozen. Adapters are merged into the
weights before a checkpoint is saved, so every saved model is a plain transformers checkpoint that
the next stage, the registry and the service load without peft."""
from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# parts the base model adds to the pretrained ones (projector, embedding readout): freshly set, small
# weights that an adapter-sized learning rate would shake (the loss jumped 3 -> 9 in a first demo run)
NEW_PARTS = ("projector.", "emb_center", "visual_readout.", "text_ngrams.", "text_scale")


def param_groups(model: nn.Module, lr: float, cfg: dict | None) -> list[dict]:
    """AdamW groups: the new parts at lr * model.finetune.new_parts_lr_scale, the rest at lr."""
    scale = float((cfg or {}).get("new_parts_lr_scale", 1.0))
    new, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (new if any(name.startswith(k) or f".{k}" in name for k in NEW_PARTS) else rest).append(p)
    return [g for g in ({"params": rest, "lr": lr}, {"params": new, "lr": lr * scale}) if g["params"]]


def prepare_for_training(model: nn.Module, cfg: dict | None) -> dict:
    """Apply `cfg` (method: full | lora; lora_r, lora_alpha, lora_dropout, lora_targets,
    train_embeddings) to a PailitaoVLModel in place; other models train in full. Returns counts."""
    cfg = cfg or {}
    method = cfg.get("method", "full")
    if method not in ("full", "lora"):
        raise ValueError(f"model.finetune.method {method!r}: use 'full' or 'lora'")
    lm = getattr(model, "language_model", None)
    if method == "lora" and lm is not None:
        from peft import LoraConfig, inject_adapter_in_model

        lm.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=int(cfg.get("lora_r", 16)), lora_alpha=int(cfg.get("lora_alpha", 32)),
                                           lora_dropout=float(cfg.get("lora_dropout", 0.0)),
                                           target_modules=list(cfg.get("lora_targets") or DEFAULT_TARGETS)), lm)
        if cfg.get("train_embeddings", False):
            lm.get_input_embeddings().requires_grad_(True)
        lm.norm.requires_grad_(True)   # a few hundred numbers: lets the output scale adapt
    if hasattr(model, "freeze_vision"):
        model.freeze_vision(bool(model.config.freeze_vision))
    counts = {"trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "total_parameters": sum(p.numel() for p in model.parameters())}
    log.info("finetune %s: %d of %d parameters train", method, counts["trainable_parameters"],
             counts["total_parameters"])
    return counts


def merge_adapters(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer and put the plain layer back. Returns how many."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
            merged += 1
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "freeze_vision"):
        model.freeze_vision(bool(model.config.freeze_vision))
    return merged
