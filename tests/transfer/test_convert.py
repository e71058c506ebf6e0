"""convert_weights accepts every documented source layout and refuses bad files clearly."""

import pickle

import pytest
import timm
import torch

from spark_det.cli import convert as convert_weights
from spark_det.io import save_atomic
from spark_det.transfer.layouts import original_convnext_to_timm

from release_fixtures import original_convnext_names


def test_original_convnext_naming_round_trips_to_timm():
    model = timm.create_model("convnext_atto")
    converted = original_convnext_to_timm(original_convnext_names(model.state_dict()))
    reference = {k: v for k, v in model.state_dict().items() if not k.startswith("head.fc.")}
    assert set(converted) == set(reference)


@pytest.mark.parametrize("layout", ["timm", "module", "state_dict", "moco", "spark_full", "convnext_release"])
def test_every_source_layout_converts(tmp_path, layout, capsys):
    if layout == "convnext_release":
        src_obj = {"model": original_convnext_names(timm.create_model("convnext_atto").state_dict())}
        arch, target = "convnext_atto", "timm"
    else:
        state = timm.create_model("resnet18").state_dict()
        src_obj = {
            "timm": state,
            "module": {"module": state},
            "state_dict": {"state_dict": state},
            "moco": {"state_dict": {f"module.encoder_q.{k}": v for k, v in state.items()}},
            "spark_full": {"model": {**{f"encoder.model.{k}": v for k, v in state.items() if not k.startswith("fc.")},
                                     "decoder.proj.weight": torch.zeros(3, 24, 1, 1)}, "epoch": 3},
        }[layout]
        arch, target = "resnet18", "detectron2"
    src = save_atomic(src_obj, tmp_path / "src.pth")
    assert convert_weights.main([str(src), str(tmp_path / "dst"), "--to", target]) == 0
    assert f"{arch}:" in capsys.readouterr().out
    if target == "detectron2":
        with open(tmp_path / "dst", "rb") as f:
            d2 = pickle.load(f)
        assert d2["matching_heuristics"] is True and "res5.1.conv2.norm.running_var" in d2["model"]
        backbone_keys = [k for k in timm.create_model("resnet18").state_dict() if not k.startswith("fc.")]
        assert len(d2["model"]) == len(backbone_keys)
    else:
        timm.create_model(arch, num_classes=0).load_state_dict(torch.load(tmp_path / "dst", weights_only=True))


def test_resnet50_gives_the_318_detectron2_entries(tmp_path, capsys):
    src = save_atomic(timm.create_model("resnet50").state_dict(), tmp_path / "r50.pth")
    assert convert_weights.main([str(src), str(tmp_path / "r50.pkl"), "--to", "detectron2"]) == 0
    assert "resnet50: 318 tensors" in capsys.readouterr().out


@pytest.mark.parametrize("case,message", [
    ("truncated", "truncated"),
    ("missing_keys", "does not cover resnet18"),
    ("unknown", "cannot infer the architecture"),
    ("missing_block", "truncated or partial"),
    ("not_a_checkpoint", "cannot read checkpoint"),
    ("absent", "does not exist"),
])
def test_bad_sources_are_refused_with_a_clear_message(tmp_path, case, message, capsys):
    state = timm.create_model("resnet18").state_dict()
    src = tmp_path / "src.pth"
    if case == "truncated":
        save_atomic(state, src)
        src.write_bytes(src.read_bytes()[:20000])
    elif case == "missing_keys":
        save_atomic({k: v for k, v in state.items() if not k.startswith("layer4.1.bn2.")}, src)
    elif case == "missing_block":
        save_atomic({k: v for k, v in state.items() if not k.startswith("layer4.1.")}, src)
    elif case == "unknown":
        save_atomic({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, src)
    elif case == "not_a_checkpoint":
        src.write_text("hello")
    dst = tmp_path / "dst.pkl"
    assert convert_weights.main([str(src), str(dst), "--to", "detectron2"]) == 1
    assert message in capsys.readouterr().err
    assert not dst.exists()


def test_shape_mismatch_is_refused(tmp_path, capsys):
    state = timm.create_model("resnet18").state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    src = save_atomic(state, tmp_path / "src.pth")
    assert convert_weights.main([str(src), str(tmp_path / "dst"), "--to", "mmdet"]) == 1
    assert "shape mismatch" in capsys.readouterr().err
