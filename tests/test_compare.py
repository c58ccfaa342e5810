"""`onnxcam compare` on real models: two exports of the pretrained EfficientNet-Lite0 agree, its int8
QDQ build drifts by a measured amount, a copy with a damaged last block is caught by the gate, a
tf2onnx-style NHWC twin of a torch net agrees with it, a float16 build with its float32 original.

Oracles: the same network exported twice (legacy vs dynamo) and the channels-last twin (same weights,
transposed layout) must agree to float rounding; the damaged copy differs by construction.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxcam.cli import main

STRICT = ["--fail-under", "pearson_min=0.9999,spearman_min=0.999,top1_agreement=1,top5_overlap_min=1",
          "--fail-over", "prob_max_abs=1e-5"]


def run(args):
    result = CliRunner().invoke(main, ["compare", *map(str, args)])
    return result


def run_json(args):
    result = run([*args, "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    pytest.importorskip("skimage")
    from example_images import write_example_images
    folder = tmp_path_factory.mktemp("photos")
    write_example_images(folder)
    return folder


@pytest.fixture(scope="module")
def exports(efficientnet_tools):
    from conftest import MODEL_CACHE
    return (efficientnet_tools.build(MODEL_CACHE / "efficientnet_lite0.onnx"),
            efficientnet_tools.build(MODEL_CACHE / "efficientnet_lite0_dynamo.onnx", dynamo=True))


@pytest.fixture(scope="module")
def quantized(exports, tmp_path_factory):
    pytest.importorskip("onnxruntime.quantization")
    from make_audit_models import quantize_int8
    out = quantize_int8(exports[0], tmp_path_factory.mktemp("qdq") / "efficientnet_lite0_int8_qdq.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(out)).graph.node}
    return out


def test_legacy_and_dynamo_exports_compare_equal(exports, photo_dir):
    legacy, dynamo = exports
    code, doc = run_json([legacy, dynamo, photo_dir, "--node", "_blocks.15", *STRICT])
    assert code == 0
    assert doc["models"] == [str(legacy), str(dynamo)] and doc["n"] == 4 and len(doc["inputs"]) == 4
    (pair,) = doc["pairs"]
    assert {"reference", "candidate", "top1_agreement", "pearson_mean", "pearson_min", "iou_top20_mean",
            "prob_max_abs", "pass"} <= set(pair)
    assert pair["pass"] is True and pair["reference"] == str(legacy) and pair["candidate"] == str(dynamo)
    assert pair["top1_agreement"] == 1.0 and pair["pearson_min"] >= 0.9999
    # measured: prob_max_abs 2.3e-7, peak distance 0, IoU of the top-20 % regions 1.0
    assert pair["prob_max_abs"] < 3e-6 and pair["peak_distance_max"] == 0.0 and pair["iou_top20_min"] >= 0.99
    assert doc["nodes"][str(legacy)] == ["/_blocks.15/_project_conv/Conv"]
    for item in doc["inputs"]:
        predictions = list(item["predictions"].values())
        assert predictions[0]["top1"] == predictions[1]["top1"] == predictions[0]["target"]


# (method, the gate's Pearson minimum, the IoU floor): measured with onnxruntime 1.32.0's quantize_static,
# Grad-CAM Pearson min 0.9962, IoU top-20 % min 0.880; EigenCAM (the activations' first principal
# component, which int8 rounding turns more than it moves a gradient-weighted sum) 0.9804 and 0.764.
# Earlier onnxruntime releases quantized closer (Grad-CAM 0.9975 / 0.936; EigenCAM passed a 0.99 gate).
QDQ_GATES = [("gradcam", 0.99, 0.8), ("eigencam", 0.97, 0.7)]


@pytest.mark.parametrize("method, pearson_gate, iou_floor", QDQ_GATES, ids=[g[0] for g in QDQ_GATES])
def test_int8_qdq_build_measured_drift(exports, quantized, photo_dir, method, pearson_gate, iou_floor):
    """quantize_static (QDQ, per-channel int8 weights, uint8 activations, calibrated on the four
    photos) at `_blocks.15`: the same top-1 class and top-5, probabilities moved by a few per cent
    (prob_max_abs 0.059, KL mean 0.012), maps close but not equal, peaks in place for Grad-CAM."""
    code, doc = run_json([exports[0], quantized, photo_dir, "--node", "_blocks.15", "--method", method,
                          "--fail-under", f"pearson_min={pearson_gate},top1_agreement=1"])
    (pair,) = doc["pairs"]
    print(f"int8 QDQ vs float32 ({method}): " + json.dumps({k: v for k, v in pair.items() if k != "failures"}))
    assert code == 0 and pair["pass"]
    assert doc["nodes"][str(quantized)][0].startswith("/_blocks.15/_project_conv/Conv")
    assert 0.01 < pair["prob_max_abs"] < 0.3          # int8 moves the probabilities, a little
    assert pair["pearson_min"] < 0.99999              # and the maps: it is not the float model
    assert pair["iou_top20_min"] > iou_floor


def test_damaged_copy_is_caught_by_the_gate(exports, photo_dir, tmp_path):
    """Measured for the damaged copy at the default node (`_swish_1`): Pearson min 0.93, top-1
    agreement 0.5; the untouched copy: Pearson 1, so a 0.99 gate on the maps alone separates them."""
    from make_audit_models import damaged_copy
    legacy, _ = exports
    copy = shutil.copy(legacy, tmp_path / "copy.onnx")
    damaged = damaged_copy(legacy, tmp_path / "damaged.onnx")
    gate = ["--fail-under", "pearson_min=0.99,iou_top20_min=0.9"]
    code, doc = run_json([legacy, copy, damaged, photo_dir, *gate])
    assert code == 1
    untouched, broken = doc["pairs"]
    assert untouched["pass"] is True and untouched["pearson_min"] == 1.0 and untouched["prob_max_abs"] == 0.0
    assert broken["pass"] is False and broken["pearson_min"] < 0.97
    assert any(f.startswith("pearson_min") for f in broken["failures"])
    assert doc["inputs"][0]["pairs"][1]["pearson"] == broken["pearson_min"]       # worst input first
    text = run([legacy, copy, photo_dir, *gate])
    assert text.exit_code == 0 and "candidate" in text.output and ": pass" in text.output
    text = run([legacy, damaged, photo_dir, *gate])
    assert text.exit_code == 1 and "FAIL (pearson_min" in text.output


# ---- a torch net and its tf2onnx-style NHWC twin ---------------------------------------------------

@pytest.fixture(scope="module")
def torch_net_and_twin(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from nhwc_twin import nhwc_twin
    from torch import nn
    from torch_export import export_legacy

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
            self.pool = nn.MaxPool2d(2)
            self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
            self.act2 = nn.ReLU()
            self.gap, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)

        def forward(self, x):
            x = self.pool(torch.relu(self.bn1(self.conv1(x))))
            x = self.act2(self.conv2(x) + x)
            return self.fc(torch.flatten(self.gap(x), 1))

    net = Net().eval()
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.2, 0.2)
        net.bn1.running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("twin")
    nchw = export_legacy(net, torch.zeros(1, 3, 64, 64), folder / "torch_nchw.onnx")
    twin = folder / "tf_nhwc.onnx"
    onnx.save(nhwc_twin(onnx.load(str(nchw))), str(twin))
    return nchw, twin


def test_nhwc_twin_of_a_torch_net_compares_equal(torch_net_and_twin, photo_dir, tmp_path):
    nchw, twin = torch_net_and_twin
    assert onnx.load(str(twin)).graph.input[0].type.tensor_type.shape.dim[3].dim_value == 3
    x = np.random.default_rng(1).normal(size=(3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "array.npy", x)                      # .npy inputs: in the reference's layout
    for method in ("gradcam", "scorecam"):
        code, doc = run_json([nchw, twin, photo_dir, tmp_path / "array.npy", "--node", "/act2/Relu",
                              "--method", method, *STRICT])
        (pair,) = doc["pairs"]
        assert code == 0 and pair["pass"], pair
        assert pair["pearson_min"] >= 0.9999 and doc["n"] == 5
    # its own target policy gives the same answer when the two agree on every top-1
    code, doc = run_json([nchw, twin, photo_dir, "--node", "/act2/Relu", "--target-policy", "own", *STRICT])
    assert code == 0 and doc["target_policy"] == "own"


def test_per_model_preprocessing_and_nodes(torch_net_and_twin, photo_dir, tmp_path):
    """Flags once per model: the twin told explicitly it is NHWC, the reference at the default node."""
    nchw, twin = torch_net_and_twin
    code, doc = run_json([nchw, twin, photo_dir, "--node", "/act2/Relu", "--node", "/act2/Relu",
                          "--preprocess", "-", "--preprocess", "size=64,64;layout=NHWC;mean=0,0,0;std=1,1,1",
                          *STRICT])
    assert code == 0
    # a different mean for the candidate only: the probabilities drift, the gate notices
    code, doc = run_json([nchw, twin, photo_dir, "--node", "/act2/Relu", "--preprocess", "-",
                          "--preprocess", "mean=0.5,0.5,0.5", *STRICT])
    assert code == 1 and not doc["pairs"][0]["pass"]


def test_float16_build_compares_with_its_float32_original(tmp_path):
    """models/shapes_cnn.onnx and its float16 conversion on four synthetic shape images.
    Measured: top-1 agreement 1.0, Pearson min 0.9999997, Spearman min 0.99995, IoU top-20 % min
    0.9988 (its outputs are saturated: prob_max_abs 1.3e-12)."""
    import cv2
    from conftest import ROOT
    from half_models import to_float16
    source = ROOT / "models" / "shapes_cnn.onnx"
    half = tmp_path / "shapes_cnn_fp16.onnx"
    onnx.save(to_float16(onnx.load(str(source))), str(half))
    rng = np.random.default_rng(0)
    for i in range(4):
        image = np.full((64, 64, 3), 30, np.uint8)
        cv2.circle(image, (int(rng.integers(16, 48)), int(rng.integers(16, 48))), 12, (220, 200, 40), -1)
        cv2.imwrite(str(tmp_path / f"shape{i}.png"), image)
    code, doc = run_json([source, half, *sorted(tmp_path.glob("shape*.png")),
                          "--fail-under", "pearson_min=0.999,top1_agreement=1", "--fail-over", "prob_max_abs=1e-6"])
    (pair,) = doc["pairs"]
    print("float16 vs float32: " + json.dumps({k: v for k, v in pair.items() if k != "failures"}))
    assert code == 0 and pair["pass"]


# ---- bad input: one line on stderr, exit 1, nothing written -----------------------------------------

def test_bad_input_is_one_line(torch_net_and_twin, photo_dir, tmp_path):
    nchw, twin = torch_net_and_twin
    cases = {
        "a reference and at least one candidate": [nchw, photo_dir],
        "no input given": [nchw, twin],
        "--node was given 3 times for 2 models": [nchw, twin, photo_dir, "--node", "a", "--node", "b",
                                                  "--node", "c"],
        "KEY=VALUE with KEY one of": [nchw, twin, photo_dir, "--preprocess", "colour=BGR"],
        "gate it with --fail-over": [nchw, twin, photo_dir, "--fail-under", "kl_max=1"],
        "does not exist": [nchw, tmp_path / "missing.onnx", photo_dir],
        "unknown CAM method": [nchw, twin, photo_dir, "--method", "nope"],
        "need --deletion": [nchw, twin, photo_dir, "--fail-over", "deletion_auc_diff_max=0.1"],
    }
    for message, args in cases.items():
        result = run([*args, "--html", tmp_path / "report.html"])
        assert result.exit_code == 1, (message, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (message, lines)
        assert not (tmp_path / "report.html").exists()
    (tmp_path / "folder.html").mkdir()
    result = run([nchw, twin, photo_dir, "--html", tmp_path / "folder.html"])
    assert result.exit_code == 1 and result.stderr.startswith("error: --html") and "is a folder" in result.stderr


def test_out_folder_and_html(torch_net_and_twin, photo_dir, tmp_path):
    import cv2
    nchw, twin = torch_net_and_twin
    np.save(tmp_path / "array.npy", np.random.default_rng(2).normal(size=(3, 64, 64)).astype(np.float32))
    result = run([nchw, twin, photo_dir, tmp_path / "array.npy", "--node", "/act2/Relu", "--out",
                  tmp_path / "out", "--html", tmp_path / "sub" / "report.html"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved["n"] == 5
    panel = cv2.imread(str(tmp_path / "out" / "chelsea_gradcam_compare.png"))
    assert panel.shape[1] == 4 * 451                  # input, two overlays, one difference (chelsea: 451 wide)
    assert cv2.imread(str(tmp_path / "out" / "array_gradcam_compare.png")).shape[1] == 4 * 256
    page = (tmp_path / "sub" / "report.html").read_text()
    assert page.count("<img ") == 20 and page.count("<svg ") == 6
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    # two inputs with one name in different folders: two pictures (-o: the short form of --out)
    (tmp_path / "again").mkdir()
    shutil.copy(photo_dir / "chelsea.png", tmp_path / "again" / "chelsea.png")
    result = run([nchw, twin, photo_dir / "chelsea.png", tmp_path / "again" / "chelsea.png", "-o",
                  tmp_path / "twice"])
    assert result.exit_code == 0 and sorted(p.name for p in (tmp_path / "twice").iterdir()) == [
        "chelsea_gradcam_compare.png", "chelsea_gradcam_compare_2.png", "compare.json"]
    # --html-inputs: pictures for the worst two only, histograms over all five
    result = run([nchw, twin, photo_dir, tmp_path / "array.npy", "--node", "/act2/Relu", "--html-inputs", "2",
                  "--html", tmp_path / "short.html"])
    short = (tmp_path / "short.html").read_text()
    assert short.count("<img ") == 8 and "(the 2 worst of 5)" in short and "(n=5)" in short
    worst = [i["input"] for i in json.loads(run([nchw, twin, photo_dir, tmp_path / "array.npy", "--node",
                                                 "/act2/Relu", "--json"]).stdout)["inputs"][:2]]
    assert all(path in short for path in worst)


# ---- the HTML report in a real browser ------------------------------------------------------------

def chromium(args, timeout=180):
    """Run headless Chromium (Debian's `chromium`); the console messages it logged, one per line."""
    import subprocess
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; "
                    "tools/run_tests.sh installs it where it can)")
    done = subprocess.run([binary, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr",
                           "--v=0", "--hide-scrollbars", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def screenshot(page, png, width=1400, height=1800):
    import cv2
    console = chromium([f"--screenshot={png}", f"--window-size={width},{height}", page.as_uri()])
    image = cv2.imread(str(png))
    assert image is not None and image.shape[:2] == (height, width)
    return console, image


def colourfulness(image) -> tuple[float, int]:
    """Share of pixels that are not near-white, and the number of distinct colours."""
    not_white = float((image.min(axis=2) < 235).mean())
    return not_white, len(np.unique(image.reshape(-1, 3), axis=0))


def test_html_report_renders_in_chromium(exports, quantized, photo_dir, tmp_path):
    """The report of the float model vs its int8 build and a damaged copy: no console message, every
    image decoded (a copy of the page with broken images is visibly poorer), nothing external."""
    from html.parser import HTMLParser
    from make_audit_models import damaged_copy
    legacy, _ = exports
    damaged = damaged_copy(legacy, tmp_path / "efficientnet_lite0_damaged.onnx")
    page = tmp_path / "report.html"
    result = run([legacy, quantized, damaged, photo_dir, "--html", page,
                  "--fail-under", "pearson_min=0.99,top1_agreement=1"])
    assert result.exit_code == 1 and page.exists(), result.output     # the damaged copy fails the gate

    class Links(HTMLParser):
        def __init__(self):
            super().__init__()
            self.links, self.tags = [], set()

        def handle_starttag(self, tag, attrs):
            self.tags.add(tag)
            self.links += [v for k, v in attrs if k in ("src", "href")]
    links = Links()
    links.feed(page.read_text())
    assert links.links and all(v.startswith("data:image/png;base64,") for v in links.links)
    assert not links.tags & {"script", "link", "iframe", "object", "embed"}

    console, image = screenshot(page, tmp_path / "shot.png")
    assert console == [], console
    not_white, colours = colourfulness(image)
    print(f"screenshot: {not_white:.2f} of the pixels not white, {colours} colours")
    assert not_white > 0.05 and colours > 10000         # photos and heatmaps are there (measured 0.13, 84215)

    broken = tmp_path / "broken.html"
    text = page.read_text()
    broken.write_text(text.replace("data:image/png;base64,", "data:image/png;base64,AAAA"))
    _, image = screenshot(broken, tmp_path / "broken.png")
    broken_not_white, broken_colours = colourfulness(image)
    print(f"with broken images: {broken_not_white:.2f} not white, {broken_colours} colours")
    assert broken_colours < colours / 20                 # measured 668: text, tables and histograms only

    noisy = tmp_path / "noisy.html"                      # the console check does hear errors
    noisy.write_text(text.replace("</body>", "<script>console.error('x'); missing();</script></body>"))
    assert len(screenshot(noisy, tmp_path / "noisy.png")[0]) == 2


def test_deletion_auc_difference(torch_net_and_twin, photo_dir):
    """--deletion scores each model with onnxcam.evaluate's deletion AUC. The twin computes the same
    function, so its AUCs equal the reference's (measured difference 6.2e-7); a candidate fed with a
    different mean (a preprocessing bug) moves them (measured 0.0076)."""
    nchw, twin = torch_net_and_twin
    code, doc = run_json([nchw, twin, photo_dir, "--node", "/act2/Relu", "--deletion",
                          "--fail-over", "deletion_auc_diff_max=1e-5"])
    (pair,) = doc["pairs"]
    assert code == 0 and pair["deletion_auc_diff_max"] < 1e-5, pair
    for item in doc["inputs"]:
        aucs = [p["deletion_auc"] for p in item["predictions"].values()]
        assert 0.0 <= aucs[0] <= 1.0 and aucs[0] == pytest.approx(aucs[1], abs=1e-5)
    code, doc = run_json([nchw, twin, photo_dir, "--node", "/act2/Relu", "--deletion",
                          "--preprocess", "-", "--preprocess", "mean=0.5,0.5,0.5"])
    assert doc["pairs"][0]["deletion_auc_diff_max"] > 1e-3
