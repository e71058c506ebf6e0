"""The paper's released files, laid out as its code writes them (tests/release_fixtures.py),
convert and start pretraining with every tensor accounted for."""

import pytest
import timm
import torch

from spark_det.cli import convert as convert_cli
from spark_det.io import save_atomic
from spark_det.model import create_spark
from spark_det.train.checkpoint import load_init_weights
from spark_det.transfer.convnext_pyramid import ConvNeXtPyramid
from spark_det.transfer.layouts import timm_encoder_state

from frameworks import assert_same_features
from release_fixtures import official_encoder, official_with_decoder


def test_the_convnext_fixture_has_the_official_key_set():
    state = official_encoder("convnext_atto")
    assert not any(k.startswith(("norm.", "head.")) for k in state)  # num_classes=0: identity norm and head
    assert "downsample_layers.0.0.weight" in state and "stages.3.1.pwconv2.weight" in state
    assert len(state) == len(timm.create_model("convnext_atto", num_classes=0).state_dict()) - 2


@pytest.mark.parametrize("release", ["encoder", "with_decoder"])
def test_convnext_releases_convert_to_every_target_with_every_backbone_tensor_from_the_file(tmp_path, release,
                                                                                           capsys):
    obj = official_encoder("convnext_atto") if release == "encoder" else official_with_decoder("convnext_atto")
    src = save_atomic(obj, tmp_path / "release.pth")
    expected = timm_encoder_state(obj)
    for target in ("timm", "mmdet"):
        dst = tmp_path / f"out_{target}.pth"
        assert convert_cli.main([str(src), "--to", target, "--output", str(dst)]) == 0
        assert "convnext_atto:" in capsys.readouterr().out
        written = torch.load(dst, weights_only=True)
        if target == "timm":
            model = timm.create_model("convnext_atto", num_classes=0)
            missing, unexpected = model.load_state_dict(written, strict=False)
            assert sorted(missing) == ["head.norm.bias", "head.norm.weight"] and not unexpected
            for k, v in written.items():
                assert torch.equal(v, expected[k]), k
        else:
            pyramid = ConvNeXtPyramid("convnext_atto").eval()
            pyramid.load_state_dict(written["state_dict"], strict=True)  # every backbone tensor, from the file
            assert set(written["state_dict"]) == set(pyramid.state_dict())
            spark = create_spark("convnext_atto", decoder_width=64)
            load_init_weights(spark, src)  # the same release as the start of a pretraining run
            x = torch.randn(2, 3, 64, 96)
            with torch.no_grad():
                assert_same_features(pyramid.forward_pyramid(x), spark.encoder.eval()(x))


@pytest.mark.parametrize("arch", ["resnet18", "convnext_atto"])
def test_with_decoder_releases_continue_pretraining_with_decoder_densify_and_mask_tokens(arch, tmp_path):
    obj = official_with_decoder(arch, decoder_width=64)
    path = save_atomic(obj, tmp_path / f"{arch}_withdecoder_1kpretrained_spark_style.pth")
    spark = create_spark(arch, decoder_width=64)
    summary = load_init_weights(spark, path)
    assert "ignored imn_m, imn_s, norm_black" in summary
    state, official = spark.state_dict(), obj["module"]
    encoder = timm_encoder_state(obj)
    for k, v in encoder.items():
        assert torch.equal(state[f"encoder.model.{k}"], v), k
    assert torch.equal(state["decoder.blocks.2.up.weight"], official["dense_decoder.dec.2.up_sample.weight"])
    assert torch.equal(state["decoder.blocks.4.conv.3.weight"], official["dense_decoder.dec.4.conv.3.weight"])
    assert torch.equal(state["decoder.proj.bias"], official["dense_decoder.proj.bias"])
    assert torch.equal(state["mask_tokens.3"], official["mask_tokens.3"])
    assert torch.equal(state["densify_projs.1.weight"], official["densify_projs.1.weight"])
    assert torch.equal(state["densify_norms.0.weight"], official["densify_norms.0.weight"])
    loaded_from_file = {"encoder.model." + k for k in encoder} | {
        k for k in state if not k.startswith("encoder.")}
    left = set(state) - loaded_from_file
    assert all(k.startswith("encoder.model.head.") for k in left), left  # only the unused final norm


def test_a_with_decoder_file_of_another_width_or_with_unknown_tensors_is_refused(tmp_path):
    spark = create_spark("resnet18", decoder_width=64)
    wide = save_atomic(official_with_decoder("resnet18", decoder_width=128), tmp_path / "wide.pth")
    with pytest.raises(Exception, match="shape mismatch"):
        load_init_weights(spark, wide)
    odd = official_with_decoder("resnet18", decoder_width=64)
    odd["module"]["dense_decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(Exception, match="unknown tensors"):
        load_init_weights(spark, save_atomic(odd, tmp_path / "odd.pth"))


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, bytes(range(256)) * 40], ids=["empty", "zeros", "random"])
def test_empty_truncated_and_random_files_give_one_line_and_exit_1(tmp_path, content, capsys):
    src = tmp_path / "bad.pth"
    src.write_bytes(content)
    assert convert_cli.main([str(src), "--to", "mmdet", "--output", str(tmp_path / "x.pth")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read checkpoint") and err.count("\n") == 1
    assert not (tmp_path / "x.pth").exists()
