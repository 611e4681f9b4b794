"""timm backbones as image towers, with weights from local files."""

from __future__ import annotations

import pytest
import timm
import torch

from vision import TimmEncoder


def test_vit_backbone_gives_timm_pre_logits_and_patch_tokens():
    encoder = TimmEncoder("vit_tiny_patch16_224", image_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = encoder(images)
        features = encoder.model.forward_features(images)
    assert encoder.out_dim == 192
    torch.testing.assert_close(out.pooled, features[:, 0])  # token pool, pre-logits
    assert out.tokens.shape == (2, 16, 192)


def test_cnn_backbone_gives_its_feature_map_as_tokens():
    encoder = TimmEncoder("resnet18").eval()
    with torch.no_grad():
        out = encoder(torch.randn(2, 3, 64, 64))
    assert out.pooled.shape == (2, encoder.out_dim) == (2, 512)
    assert out.tokens.shape == (2, 4, 512)  # 2x2 feature map
    torch.testing.assert_close(out.pooled, out.tokens.mean(dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_load_from_a_local_file(tmp_path, suffix):
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    encoder = TimmEncoder("resnet18", pretrained_path=str(path))
    for name, tensor in encoder.model.state_dict().items():
        torch.testing.assert_close(tensor, source.state_dict()[name])


def test_unknown_model_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no model called"):
        TimmEncoder("resnet_does_not_exist")
    with pytest.raises(FileNotFoundError, match="pretrained_path"):
        TimmEncoder("resnet18", pretrained_path=str(tmp_path / "missing.pth"))
