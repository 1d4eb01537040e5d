"""Architecture inference (clip_load.infer_config / build_clip) from state-dict shapes and key names.

B/16, B/32 and L/14 shapes come from models built on the meta device (no memory, no weights)."""
import pytest
import torch

import clip
import clip_load
from conftest import SMALL_CONFIG, clip_features, random_clip


def meta_state_dict(config):
    with torch.device("meta"):
        return clip.CLIP(**config).state_dict()


@pytest.mark.parametrize("config, tokens", [(clip.VIT_B16_CONFIG, 197), (clip.VIT_B32_CONFIG, 50),
                                            (clip.VIT_L14_CONFIG, 257), (SMALL_CONFIG, 17)])
def test_infer_config_from_shapes(config, tokens):
    sd = meta_state_dict(config)
    assert sd["visual.positional_embedding"].shape[0] == tokens  # 1 + (R / p)^2
    assert clip_load.infer_config(sd) == config


def test_infer_config_reads_every_size_from_the_checkpoint():
    # odd sizes everywhere: nothing may come from a hard-coded 512 / 768 / 12
    config = dict(embed_dim=48, image_resolution=36, vision_layers=3, vision_width=128, vision_patch_size=12,
                  context_length=20, vocab_size=300, transformer_width=192, transformer_heads=3, transformer_layers=1)
    sd = meta_state_dict(config)
    assert clip_load.infer_config(sd) == config
    model = clip_load.build_clip(random_clip(config).state_dict())
    assert model.visual.transformer.resblocks[0].attn.heads == 2 and model.transformer.resblocks[0].attn.heads == 3
    assert model.encode_image(torch.zeros(2, 3, 36, 36)).shape == (2, 48)


def test_build_clip_strict_round_trip():
    model = random_clip(seed=3)
    sd = model.state_dict()
    rebuilt = clip_load.build_clip(sd)
    assert rebuilt.config == model.config and not rebuilt.training
    assert list(rebuilt.state_dict()) == list(sd)
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in sd.items())
    for a, b in zip(clip_features(rebuilt), clip_features(model)):
        assert torch.equal(a, b)
    blocks = [*rebuilt.transformer.resblocks, *rebuilt.visual.transformer.resblocks]
    assert all(type(b.mlp.gelu) is clip.QuickGELU for b in blocks)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        clip_load.build_clip({**sd, "visual.extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="Missing key"):
        clip_load.build_clip({k: v for k, v in sd.items() if k != "visual.ln_post.bias"})


def test_openai_non_tensor_entries_are_ignored():
    sd = random_clip().state_dict()
    extras = {"input_resolution": 32, "context_length": torch.tensor(77), "vocab_size": 49408}
    model = clip_load.build_clip({**sd, **extras})
    assert model.config == SMALL_CONFIG


def test_resnet_checkpoint_is_not_supported(tmp_path):
    sd = {"visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1), "visual.attnpool.positional_embedding":
          torch.zeros(50, 2048), "visual.attnpool.c_proj.weight": torch.zeros(1024, 2048),
          "text_projection": torch.zeros(512, 1024), "positional_embedding": torch.zeros(77, 512)}
    with pytest.raises(ValueError, match="ResNet.*not supported"):
        clip_load.infer_config(sd)
    path = tmp_path / "RN50.pt"
    torch.save(sd, path)
    with pytest.raises(clip_load.CheckpointError, match="RN50.pt.*ResNet.*not supported"):
        clip_load.load_clip(path)


def test_not_a_clip_state_dict():
    with pytest.raises(ValueError, match="visual.proj"):
        clip_load.infer_config({"fc.weight": torch.zeros(2, 2)})
    sd = random_clip().state_dict()
    del sd["token_embedding.weight"]
    with pytest.raises(ValueError, match="token_embedding.weight"):
        clip_load.infer_config(sd)
