"""Token activations: a small ViT (torchvision's layout, seeded, legacy and dynamo exports) explained
at token nodes equals the torch route with pytorch-grad-cam's documented ViT reshape_transform on
the same weights and photos — autograd for the gradients, torch forward passes for Score-CAM; a
Swin-style channels-last stage equals torch autograd; the grid guess on hand-made token counts."""
from __future__ import annotations

import numpy as np
import pytest

from onnxcam.errors import OnnxcamError
from onnxcam.tokens import TokenGrid, token_grid

torch = pytest.importorskip("torch")

from onnxcam import Explainer  # noqa: E402
from onnxcam.model import load_model  # noqa: E402
from onnxcam.nodes import default_node, list_candidates  # noqa: E402
import torch_oracle  # noqa: E402
from torch_export import export_dynamo, export_legacy  # noqa: E402
from vit_models import SwinStyle, TinyViT, photo_batch, vit_reshape_transform  # noqa: E402

# measured (both exporters, float32 ONNX vs float64 torch maps): <= 1.4e-6 for the gradient methods and
# EigenCAM, 3.3e-5 for Score-CAM (float32 scores of masked inputs through a softmax over channels);
# about 10x, and never looser than the 1e-4
ATOL = 1.5e-5
ATOL_SCORECAM = 1e-4
SIZE = (32, 48)                      # not square: a transposed grid would show
METHODS = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "scorecam"]
LN1 = "encoder/layers/encoder_layer_1/ln_1"


# ---------------------------------------------------------------- the grid guess (no model)

@pytest.mark.parametrize("shape, size, expected", [
    ((1, 197, 768), (224, 224), TokenGrid(1, 14, 14)),        # ViT-B/16: class token
    ((1, 198, 768), (224, 224), TokenGrid(2, 14, 14)),        # DeiT distilled: class + distillation
    ((1, 261, 384), (224, 224), TokenGrid(5, 16, 16)),        # DINOv2-reg/14: class + 4 registers
    ((1, 49, 768), (224, 224), TokenGrid(0, 7, 7)),           # Swin (N, H·W, C)
    ((1, 25, 24), (32, 48), TokenGrid(1, 4, 6)),              # non-square
])
def test_grid_guess(shape, size, expected):
    assert token_grid(shape, size) == expected


def test_grid_overrides_and_errors():
    assert token_grid((1, 197, 8), (224, 224), grid=(14, 14)) == TokenGrid(1, 14, 14)
    assert token_grid((1, 201, 8), (224, 224), prefix=5) == TokenGrid(5, 14, 14)
    assert token_grid((1, 201, 8), (224, 224), grid=(4, 49), prefix=5) == TokenGrid(5, 4, 49)
    assert token_grid((1, 8, 16, 16), (224, 224)) is None      # rank 4: layouts' business
    assert token_grid((1, 8, 100), (100,)) is None             # 1D model: (N, C, L) is no token tensor
    with pytest.raises(OnnxcamError, match="--tokens-grid"):
        token_grid((1, 197, 8), (224, 224), grid=(10, 10))
    with pytest.raises(OnnxcamError, match="--tokens-grid"):
        token_grid((1, 1000, 7), (13, 17))


def test_to_map_is_the_documented_reshape():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(2, 25, 6)).astype(np.float32)
    theirs = vit_reshape_transform(torch.from_numpy(tokens), 4, 6).numpy()
    np.testing.assert_array_equal(TokenGrid(1, 4, 6).to_map(tokens), theirs)


# ---------------------------------------------------------------- the ViT against torch

@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def vit(request, tmp_path_factory):
    net = TinyViT(SIZE).eval()
    path = tmp_path_factory.mktemp("vit") / f"vit_{request.param}.onnx"
    if request.param == "legacy":
        export_legacy(net, torch.zeros(1, 3, *SIZE), path)
    else:   # an example batch of 1 lets torch.export specialise nn.MultiheadAttention's batch to 1
        export_dynamo(net, torch.zeros(2, 3, *SIZE), path)
    return net, path, photo_batch(SIZE, 3)


def _reference(method, net, modules, x, targets):
    """Maps by the torch route: autograd at each module's output, the documented reshape_transform,
    then tests/torch_oracle.py's formulas (pytorch-grad-cam 1.5.x)."""
    layer_maps = []
    for module in modules:
        A, G, _ = torch_oracle.activations_and_gradients(net, module, x, targets)
        A, G = (vit_reshape_transform(torch.from_numpy(t), *net.grid, net.prefix).numpy() for t in (A, G))
        weights = torch_oracle.scorecam_weights(net, A, x, targets) if method == "scorecam" else None
        layer_maps.append(torch_oracle.layer_map(method, A, G, weights))
    return torch_oracle.final_maps(layer_maps, x.shape[2:])


@pytest.mark.parametrize("method", METHODS)
def test_vit_methods_equal_torch(vit, method):
    net, path, x = vit
    targets = [3, 0, 4]
    explainer = Explainer(str(path), LN1, cache=False)
    assert explainer.nodes[0].shape[1:] == (25, 24)
    ours = explainer.explain(x, method=method, targets=targets)
    theirs = _reference(method, net, [net.encoder.layers.encoder_layer_1.ln_1], x, targets)
    assert ours.layer_maps[0].shape == (3, 4, 6)
    assert np.abs(ours.maps - theirs).max() <= (ATOL_SCORECAM if method == "scorecam" else ATOL)


def test_vit_multi_node_fusion(vit):
    net, path, x = vit
    targets = [1, 2, 2]
    explainer = Explainer(str(path), ["encoder/layers/encoder_layer_0/ln_1", LN1], cache=False)
    ours = explainer.explain(x, method="layercam", targets=targets).maps
    blocks = net.encoder.layers
    theirs = _reference("layercam", net, [blocks.encoder_layer_0.ln_1, blocks.encoder_layer_1.ln_1], x, targets)
    assert np.abs(ours - theirs).max() <= ATOL


def test_vit_default_node_is_last_block_ln_1(vit):
    _, path, _ = vit
    model = load_model(str(path))
    candidates = list_candidates(model)
    chosen = default_node(candidates, model)
    assert chosen.scope.split("/")[-1] in ("ln_1", "encoder.layers.encoder_layer_1.ln_1")
    assert "encoder_layer_1" in chosen.scope
    assert chosen.tensor == Explainer(str(path), LN1, cache=False).nodes[0].tensor


def test_register_tokens_and_override(tmp_path):
    net = TinyViT(SIZE, registers=2, seed=1).eval()
    path = export_legacy(net, torch.zeros(1, 3, *SIZE), tmp_path / "reg.onnx")
    x = photo_batch(SIZE, 2)
    targets = [0, 1]
    theirs = _reference("gradcam", net, [net.encoder.layers.encoder_layer_1.ln_1], x, targets)
    guessed = Explainer(str(path), LN1, cache=False).explain(x, targets=targets).maps
    forced = Explainer(str(path), LN1, cache=False, tokens_grid=(4, 6), prefix_tokens=3).explain(
        x, targets=targets).maps
    assert np.abs(guessed - theirs).max() <= ATOL
    assert np.abs(forced - theirs).max() <= ATOL
    wrong = Explainer(str(path), LN1, cache=False, prefix_tokens=1, tokens_grid=(4, 6))
    with pytest.raises(OnnxcamError, match="--tokens-grid"):
        wrong.explain(x, targets=targets)


# ---------------------------------------------------------------- Swin-style channels-last

@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_swin_style_channels_last_equals_autograd(tmp_path, stage):
    net = SwinStyle().eval()
    path = export_legacy(net, torch.zeros(1, 3, 32, 32), tmp_path / "swin.onnx")
    x = photo_batch((32, 32), 2)
    targets = [2, 1]
    A, G, _ = torch_oracle.activations_and_gradients(net, getattr(net, stage), x, targets)
    if stage == "stage1":                                   # (N, H, W, C)
        A, G = (np.ascontiguousarray(t.transpose(0, 3, 1, 2)) for t in (A, G))
    else:                                                   # (N, H·W, C), no prefix
        A, G = (vit_reshape_transform(torch.from_numpy(t), 4, 4, 0).numpy() for t in (A, G))
    for method in ("gradcam", "hirescam"):
        theirs = torch_oracle.final_maps([torch_oracle.layer_map(method, A, G)], (32, 32))
        ours = Explainer(str(path), stage, cache=False).explain(x, method=method, targets=targets).maps
        assert np.abs(ours - theirs).max() <= ATOL


# ---------------------------------------------------------------- command line

def test_cli_lists_token_grids_and_explains(tmp_path):
    import json

    import cv2
    from click.testing import CliRunner
    from skimage import data

    from onnxcam.cli import main
    net = TinyViT(SIZE).eval()
    path = export_legacy(net, torch.zeros(1, 3, *SIZE), tmp_path / "vit.onnx")
    listing = CliRunner().invoke(main, ["nodes", str(path)])
    assert listing.exit_code == 0, listing.output
    rows = {line[3:].split()[0]: line for line in listing.output.splitlines()
            if "/ln_1/" in line and not line.startswith("* default")}
    assert rows["/encoder/layers/encoder_layer_1/ln_1/LayerNormalization"].startswith("*")
    assert all(line.rstrip().endswith("4x6 tokens after 1 prefix token") for line in rows.values())
    listed = json.loads(CliRunner().invoke(main, ["nodes", str(path), "--json"]).stdout)
    assert {row["token_grid"] for row in listed if "ln_1" in row["scope"]} == {"4x6 tokens after 1 prefix token"}
    photo = tmp_path / "cat.png"
    cv2.imwrite(str(photo), cv2.cvtColor(data.chelsea(), cv2.COLOR_RGB2BGR))
    out = CliRunner().invoke(main, ["explain", str(path), str(photo), "--out", str(tmp_path / "out"), "--npy",
                                    "--tokens-grid", "4,6", "--prefix-tokens", "1", "--json"])
    assert out.exit_code == 0, out.output
    cam = np.load(tmp_path / "out" / "cat_gradcam.npy")
    assert cam.shape == SIZE and cam.max() == pytest.approx(1.0)
    bad = CliRunner().invoke(main, ["explain", str(path), str(photo), "--out", str(tmp_path / "bad"),
                                    "--tokens-grid", "6,6"])
    assert bad.exit_code == 1
    assert bad.stderr.startswith("error: cannot lay the tokens of shape (1, 25, 24) on a patch grid of the "
                                 "32x48 input with --tokens-grid 6,6")
    assert not (tmp_path / "bad" / "cat_gradcam.png").exists()
