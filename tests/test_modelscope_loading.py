"""A tiny random-init ModelScope-layout folder saved with save_pretrained loads back."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vpure.runtime import registry
from vpure.runtime.errors import CheckpointError
from vpure.runtime.models import modelscope
from vpure.runtime.models.diffusion import TINY_UNET, TINY_VAE


def _make_folder(root, cross_dim=TINY_UNET["cross_attention_dim"]):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    UNet3DConditionModel(**TINY_UNET).save_pretrained(root / "unet")
    AutoencoderKL(**TINY_VAE).save_pretrained(root / "vae")
    CLIPTextModel(CLIPTextConfig(vocab_size=6, hidden_size=cross_dim, intermediate_size=37, num_attention_heads=4,
                                 num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(root / "text_encoder")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (root / "v.json").write_text(json.dumps(vocab))
    (root / "m.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(root / "v.json"), str(root / "m.txt"), pad_token="<|endoftext|>",
                  model_max_length=77).save_pretrained(root / "tokenizer")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_config(root / "scheduler")
    return root


@pytest.fixture()
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("VPURE_CACHE", str(tmp_path / "cache"))
    return _make_folder(tmp_path / "modelscope")


def test_load_caches_embedding_and_runs_without_text_encoder(folder):
    model = modelscope.load_modelscope(folder)
    assert (folder / modelscope.EMBEDDING_FILE).is_file()
    assert model.unet.prompt_embedding.shape == (1, 77, TINY_UNET["cross_attention_dim"])
    spec = registry.get("unet")
    inputs = spec.sample_inputs(seed=0)
    with torch.inference_mode():
        out = model.unet(*inputs.values())
    shutil.rmtree(folder / "text_encoder")
    shutil.rmtree(folder / "tokenizer")
    again = spec.load(folder)  # registry loader, cached embedding only
    with torch.inference_mode():
        assert torch.equal(again(*inputs.values()), out)
    frames = registry.get("vae_encoder").sample_inputs(seed=1)["frames"]
    with torch.inference_mode():
        z = model.vae_encoder(frames)
        assert z.shape == (1, 4, 2, 8, 8)
        assert torch.equal(registry.get("vae_encoder").load(folder)(frames), z)
        x = model.vae_decoder(z)
    assert x.shape == frames.shape and float(x.min()) >= 0 and float(x.max()) <= 1


def test_unwritable_folder_caches_in_cache_dir(folder, tmp_path, monkeypatch):
    import safetensors.torch as st

    real_save = st.save_file

    def save(tensors, filename, metadata=None):  # the model folder refuses writes (as a read-only mount would)
        if str(filename).startswith(str(folder)):
            raise PermissionError(f"read-only: {filename}")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", save)
    emb = modelscope.empty_prompt_embedding(folder)
    assert not (folder / modelscope.EMBEDDING_FILE).exists()
    (cached,) = (tmp_path / "cache").rglob(modelscope.EMBEDDING_FILE)
    monkeypatch.setattr(st, "save_file", real_save)
    shutil.rmtree(folder / "text_encoder")  # the cached copy is found without the encoder
    assert torch.equal(modelscope.empty_prompt_embedding(folder), emb)


def test_errors_name_the_problem(folder, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        modelscope.load_modelscope(tmp_path / "nowhere")
    shutil.move(str(folder / "vae"), str(tmp_path / "vae_moved"))
    with pytest.raises(CheckpointError, match="no usable vae/"):
        modelscope.load_modelscope(folder)
    shutil.move(str(tmp_path / "vae_moved"), str(folder / "vae"))
    (folder / "unet" / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="cannot load the UNet3D"):
        modelscope.load_unet(folder)
    with pytest.raises(CheckpointError, match="floating torch dtype"):
        modelscope.load_vae_encoder(folder, dtype=torch.int8)


def test_embedding_width_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("VPURE_CACHE", str(tmp_path / "cache"))
    root = _make_folder(tmp_path / "ms", cross_dim=16)  # text encoder width != UNet cross_attention_dim
    with pytest.raises(CheckpointError, match="does not match the UNet's cross_attention_dim"):
        modelscope.load_unet(root)


def test_corrupt_cached_embedding_is_recomputed_with_a_warning(folder, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VPURE_CACHE", str(tmp_path / "cache"))
    good = modelscope.compute_empty_prompt_embedding(folder)
    (folder / modelscope.EMBEDDING_FILE).write_bytes(b"garbage")
    with caplog.at_level("WARNING"):
        emb = modelscope.empty_prompt_embedding(folder)
    assert "unreadable" in caplog.text and "recomputing" in caplog.text
    assert torch.equal(emb, good)
    assert torch.equal(modelscope.empty_prompt_embedding(folder), good)  # the cache was rewritten whole


def test_a_pickled_text_encoder_that_weights_only_refuses_is_a_one_line_error(folder):
    import datetime

    enc = folder / "text_encoder"
    for f in enc.glob("*.safetensors"):
        f.unlink()
    torch.save({"weights": datetime.datetime.now()}, enc / "pytorch_model.bin")  # not plain tensors
    with pytest.raises(CheckpointError) as e:
        modelscope.empty_prompt_embedding(folder)
    assert str(e.value).startswith(f"cannot load the text encoder from {enc}: ") and "\n" not in str(e.value)
