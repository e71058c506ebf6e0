"""Weights in the field's formats: a pretraining run's safetensors exports, its export folder
(timm's local-folder layout and model card) and summary.csv; conversion and --init-weights from
safetensors."""

import csv
import json
import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

from spark_det.cli import convert as convert_cli
from spark_det.cli import pretrain as pretrain_cli
from spark_det.errors import EXIT_BAD_FILE, EXIT_BAD_INPUT
from spark_det.io import file_sha256, load_file
from spark_det.train import Pretrainer, load_config
from spark_det.transfer.export import ModelCard, write_export_folder

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "pretrain" / "resnet18_smoke.yaml")


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def images(unlabeled_images):
    return unlabeled_images(16)


@pytest.fixture(scope="module")
def run_dir(images, tmp_path_factory):
    """Two epochs of two iterations of the smoke recipe."""
    out = tmp_path_factory.mktemp("run") / "r18"
    assert pretrain_cli.main(["--recipe", RECIPE, "--data", str(images), "--output", str(out), "--device", "cpu",
                              "epochs=2", "batch_size=8", "warmup_epochs=1", "leak_audit=false"]) == 0
    return out


def test_safetensors_export_beside_the_pth_holds_the_same_tensors_and_loads_in_timm_strictly(run_dir):
    pth, safe = run_dir / "encoder-resnet18.pth", run_dir / "encoder-resnet18.safetensors"
    assert (run_dir / "encoder-resnet18-epoch001.safetensors").is_file()  # the periodic exports too
    a, b = torch.load(pth, weights_only=True), load_file(safe)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(safe), "pt") as f:
        assert f.metadata() == {"format": "pt", "arch": "resnet18"}
    model = timm.create_model("resnet18", num_classes=0)
    model.load_state_dict(b, strict=True)


def test_export_folder_loads_offline_through_timms_own_mechanisms(run_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = run_dir / "export-resnet18"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    exported = load_file(run_dir / "encoder-resnet18.safetensors")
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == 0 and config["num_features"] == 512
    pretrained_cfg = config["pretrained_cfg"]
    assert pretrained_cfg["input_size"] == [3, 64, 64]
    assert pretrained_cfg["mean"] == [0.485, 0.456, 0.406] and pretrained_cfg["std"] == [0.229, 0.224, 0.225]
    assert pretrained_cfg["tag"] == "spark_det" and "origin_url" not in pretrained_cfg  # not timm's own weights

    from_folder = timm.create_model(f"local-dir:{folder}", pretrained=True)
    overlay = timm.create_model("resnet18", pretrained=True, num_classes=0,
                                pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors")))
    for model in (from_folder, overlay):
        state = model.state_dict()
        assert state.keys() == exported.keys() and all(torch.equal(state[k], exported[k]) for k in state)
    assert from_folder.pretrained_cfg["input_size"] == (3, 64, 64)
    assert tuple(timm.data.resolve_data_config({}, model=from_folder)["mean"]) == (0.485, 0.456, 0.406)


def test_a_killed_export_is_redone_without_its_temporaries(run_dir, tmp_path):
    folder = tmp_path / "export-resnet18"
    folder.mkdir()
    (folder / ".model.safetensors.x1y2.tmp").write_bytes(b"half a file")  # what a kill -9 leaves
    (folder / ".config.json.writing.tmp").write_text("{")
    write_export_folder(load_file(run_dir / "encoder-resnet18.safetensors"), "resnet18", folder,
                        ModelCard(data="somewhere"), (64, 64))
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_model_card_states_provenance_digest_and_how_to_load(run_dir, images):
    folder = run_dir / "export-resnet18"
    card = (folder / "README.md").read_text()
    final_loss = losses(run_dir)[-1]
    for fact in (file_sha256(folder / "model.safetensors"), f"{final_loss:.4f}", "| epochs | 2 |", "spark-det ",
                 "commit ", f"| data | {images} (16 images", "local-dir:", "--to detectron2", "--to mmdet"):
        assert fact in card, fact
    import spark_det
    assert f"spark-det {spark_det.__version__} (commit " in card


def test_summary_csv_has_one_timm_style_row_per_epoch(run_dir):
    with open(run_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert list(rows[0])[:2] == ["epoch", "train_loss"] and list(rows[0])[-1] == "lr"
    for row in rows:
        epoch = [r for r in records if r["epoch"] == int(row["epoch"])]
        assert float(row["train_loss"]) == pytest.approx(sum(r["loss"] for r in epoch) / len(epoch), rel=1e-12)
        assert float(row["lr"]) == epoch[-1]["lr"]


def test_summary_csv_is_rewound_on_resume(images, tmp_path):
    out = tmp_path / "r"
    common = ["--recipe", RECIPE, "--data", str(images), "--output", str(out), "--device", "cpu", "epochs=2",
              "batch_size=8", "warmup_epochs=1", "leak_audit=false"]
    assert pretrain_cli.main([*common, "stop_after_iters=3"]) == 0  # epoch 0 done, stopped inside epoch 1
    summary = out / "summary.csv"
    summary.write_text(summary.read_text() + "1,9.0,9.0,9.0,0,9.0\n")  # the row of a run killed after its checkpoint
    resumed = Pretrainer(load_config(RECIPE, ["epochs=2", "batch_size=8", "warmup_epochs=1", "leak_audit=false"]),
                         data=images, output=out, resume="auto", device="cpu")
    resumed.close()
    with open(summary, newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0]  # rewound to the checkpoint (epoch 1, iteration 1)
    assert pretrain_cli.main([*common, "--resume", "auto"]) == 0
    with open(summary, newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1]


@pytest.mark.parametrize("to,suffix", [("detectron2", ".pkl"), ("mmdet", ".pth"), ("timm", ".safetensors")])
def test_convert_reads_the_safetensors_export(run_dir, tmp_path, to, suffix):
    src = run_dir / "encoder-resnet18.safetensors"
    dst = tmp_path / f"out{suffix}"
    assert convert_cli.main([str(src), str(dst), "--to", to]) == 0
    exported = load_file(src)
    if to != "timm":  # the same file as from the .pth (whose conversions the framework tests load)
        from_pth = tmp_path / f"from_pth{suffix}"
        assert convert_cli.main([str(run_dir / "encoder-resnet18.pth"), str(from_pth), "--to", to]) == 0
        a, b = (load_file(p) if to == "mmdet" else pickle.loads(p.read_bytes()) for p in (dst, from_pth))
        key = "state_dict" if to == "mmdet" else "model"
        assert a.keys() == b.keys() and a[key].keys() == b[key].keys()
        assert all((torch.as_tensor(a[key][k]) == torch.as_tensor(b[key][k])).all() for k in a[key])
    if to == "detectron2":
        with open(dst, "rb") as f:
            model = pickle.load(f)["model"]
        assert torch.equal(torch.from_numpy(model["res2.0.conv1.norm.weight"]), exported["layer1.0.bn1.weight"])
        assert torch.equal(torch.from_numpy(model["stem.conv1.weight"]), exported["conv1.weight"])
    elif to == "mmdet":
        state = torch.load(dst, weights_only=True)["state_dict"]
        assert state.keys() == exported.keys() and torch.equal(state["layer4.1.conv2.weight"],
                                                               exported["layer4.1.conv2.weight"])
    else:
        assert load_file(dst).keys() == exported.keys()


def test_convert_writes_safetensors_from_a_pth_and_refuses_it_for_detection_targets(run_dir, tmp_path, capsys):
    dst = tmp_path / "r18.safetensors"
    assert convert_cli.main([str(run_dir / "encoder-resnet18.pth"), str(dst), "--to", "torchvision"]) == 0
    timm.create_model("resnet18", num_classes=0).load_state_dict(load_file(dst), strict=True)
    capsys.readouterr()
    assert convert_cli.main([str(run_dir / "encoder-resnet18.pth"), str(tmp_path / "d2.safetensors"),
                             "--to", "detectron2"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Detectron2 reads .pkl" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d2.safetensors").exists()


def test_a_truncated_safetensors_file_is_one_error_line(run_dir, tmp_path, capsys):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes((run_dir / "encoder-resnet18.safetensors").read_bytes()[:1000])
    assert convert_cli.main([str(bad), str(tmp_path / "x.pth"), "--to", "timm"]) == EXIT_BAD_FILE
    err = capsys.readouterr().err
    assert "cannot read safetensors file" in err and "Traceback" not in err


def test_init_weights_from_the_safetensors_export(run_dir, images, tmp_path):
    out = tmp_path / "continued"
    assert pretrain_cli.main(["--recipe", RECIPE, "--data", str(images), "--output", str(out), "--device", "cpu",
                              "epochs=1", "batch_size=8", "warmup_epochs=1", "leak_audit=false", "lr=0",
                              "base_lr=0", "--init-weights", str(run_dir / "encoder-resnet18.safetensors")]) == 0
    start = load_file(run_dir / "encoder-resnet18.safetensors")
    after = load_file(out / "encoder-resnet18.safetensors")
    # lr=0: conv weights unchanged (BatchNorm running statistics still move)
    assert all(torch.equal(after[k], start[k]) for k in start if k.endswith("conv1.weight"))


def test_the_generic_timm_detection_backbone_loads_the_safetensors_export(run_dir):
    # TimmPyramid is what Detectron2's build_timm_fpn_backbone and MMDetection's SparKTimm load exports with
    from spark_det.transfer.timm_pyramid import TimmPyramid

    pyramid = TimmPyramid("resnet18")
    with torch.no_grad():
        for p in pyramid.parameters():
            p.fill_(0.123)
    pyramid.load_export(run_dir / "encoder-resnet18.safetensors")
    exported = load_file(run_dir / "encoder-resnet18.safetensors")
    assert all(torch.equal(v, exported[k]) for k, v in pyramid.model.state_dict().items())
