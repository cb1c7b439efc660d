"""Lightning training of the reranker (training/reranker.py).

list: pairwise logistic over discordant pairs + NULL loss + next-token loss at the answer
position + the absolute scorer's 4-level cross-entropy (each switchable for the ablation);
point: binary cross-entropy of P(yes) against "instance match"."""
from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

from training.losses import level_loss, null_loss, pairwise_logistic_loss
from training.reranker import POINT, MLLMReranker, answer_targets


class RerankerModule(L.LightningModule):
    def __init__(self, model: MLLMReranker, cfg: dict, total_steps: int):
        super().__init__()
        self.model, self.cfg, self.total_steps = model, cfg, total_steps
        self.model.train()

    def losses(self, batch: dict) -> dict:
        out = self.model(self.model.prepare(batch["queries"], batch["docs"]))
        levels = batch["levels"].to(out.answer_logits.device)
        cfg = self.cfg
        if self.model.mode == POINT:
            return {"bce": F.binary_cross_entropy_with_logits(out.yes_logit, (levels[:, 0] == 0).float())}
        m = out.s.shape[1]
        levels = levels[:, :m]
        parts = {"pairwise": pairwise_logistic_loss(out.s, levels, cfg["tau"])}
        if cfg["null_weight"]:
            parts["null"] = cfg["null_weight"] * null_loss(out.s, out.s_null, levels, cfg["tau"])
        if cfg["lm_weight"]:
            target = answer_targets(levels, self.model.index_ids, self.model.null_id)
            parts["lm"] = cfg["lm_weight"] * F.cross_entropy(out.answer_logits, target)
        if out.level_logits is not None:
            parts["absolute"] = cfg["absolute_weight"] * level_loss(out.level_logits, levels)
        return parts

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        parts = self.losses(batch)
        loss = sum(parts.values())
        for k, v in parts.items():
            self.log(f"train/{k}", v)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        # the LM head and the scorer start untrained (the embedder has neither): a higher lr
        fresh = list(self.model.lm.lm_head.parameters()) + (list(self.model.scorer.parameters()) if self.model.scorer else [])
        ids = {id(p) for p in fresh}
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]
        opt = torch.optim.AdamW([{"params": rest, "lr": self.cfg["lr"]}, {"params": fresh, "lr": self.cfg["head_lr"]}],
                                weight_decay=self.cfg["weight_decay"])
        sched = get_cosine_schedule_with_warmup(opt, math.ceil(self.cfg["warmup"] * self.total_steps), self.total_steps)
        return [opt], [{"scheduler": sched, "interval": "step"}]
