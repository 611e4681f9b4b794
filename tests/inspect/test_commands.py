"""`multimodal attention` on tiny random digits checkpoints (a CLIP and a captioner): the
overlays and index.html it writes, the similarities it shows against a direct computation, and
each generated word's map against the decoder's attention during step-by-step generation."""

from __future__ import annotations

import html
import json

import pytest
import torch
from PIL import Image

from multimodal.inspect.commands import collect_images, main
from multimodal.inspect.maps import caption_attention

TEXTS = ["a photo of the number three", "<b>seven</b> & co"]


def read_manifest(out):
    return json.loads((out / "attention.json").read_text())


def check_page(out, manifest) -> str:
    """Every PNG the manifest names exists, is an image, and the page shows it."""
    page = (out / "index.html").read_text()
    files = [e["image"] for e in manifest["images"]] + [e["rollout"] for e in manifest["images"]]
    files += [layer["file"] for e in manifest["images"] for layer in e["layers"]]
    files += [w["file"] for e in manifest["images"] for w in e.get("words", [])]
    for file in files:
        with Image.open(out / file) as image:
            assert image.format == "PNG" and image.size == (224, 224)  # 32 px x 7
        assert f'src="{file}"' in page
    assert sorted(p.name for p in out.glob("*.png")) == sorted(files)
    assert "<script" not in page and "http" not in page  # self-contained, relative paths
    return page


def test_clip_overlays_similarities_and_page(tiny_clip, loaded_clip, image_files, tmp_path, capsys):
    checkpoint, config = tiny_clip
    folder, jpeg = image_files
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--config", str(config), "--images", str(folder)]
    argv += [str(jpeg), "--text", TEXTS[0], "--text", TEXTS[1], "--layer", "all", "--head", "1"]
    argv += ["--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    assert str(out / "index.html") in capsys.readouterr().out
    manifest = read_manifest(out)
    images = manifest["images"]
    assert [e["source"] for e in images] == [str(p) for p in collect_images([folder, jpeg])]
    assert [[layer["layer"] for layer in e["layers"]] for e in images] == [[0, 1]] * 3
    page = check_page(out, manifest)
    assert html.escape(TEXTS[1]) in page and TEXTS[1] not in page  # escaped
    # the similarities equal the model's own embeddings of the same images and texts
    loaded = loaded_clip
    tokens = loaded.tokenizer.batch_encode(TEXTS, max_length=loaded.context_length)
    with torch.no_grad():
        text = loaded.model.encode_text(tokens.input_ids, tokens.attention_mask)
        for entry in images:
            with Image.open(entry["source"]) as image:
                pixels = loaded.transform(image.convert("RGB"))[None]
            expected = (loaded.model.encode_image(pixels) @ text.T)[0].tolist()
            assert list(entry["similarities"].values()) == pytest.approx(expected, abs=1e-5)
            assert list(entry["similarities"]) == TEXTS


def test_captioner_words_and_page(tiny_captioner, loaded_captioner, image_files, tmp_path):
    checkpoint, config = tiny_captioner
    folder, _ = image_files
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--config", str(config), "--images", str(folder)]
    argv += ["--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    manifest = read_manifest(out)
    loaded = loaded_captioner
    for entry in manifest["images"]:
        with Image.open(entry["source"]) as image:
            pixels = loaded.transform(image.convert("RGB"))[None]
        caption = caption_attention(loaded.model, pixels)
        assert entry["caption"] == loaded.tokenizer.decode(caption.token_ids)
        assert [w["token_id"] for w in entry["words"]] == caption.token_ids
        assert {w["layer"] for w in entry["words"]} <= {0}  # the last (only) decoder layer
    assert sum(len(e["words"]) for e in manifest["images"]) > 0  # random weights still talk
    page = check_page(out, manifest)
    assert "Generated caption" in page


def test_replayed_cross_attention_is_the_one_seen_during_generation(loaded_captioner):
    model = loaded_captioner.model
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    caption = caption_attention(model, image)
    assert caption.token_ids  # a random decoder of 16 positions writes something
    context = model.image_tokens(image)
    ids = [model.decoder.config.bos_id]
    with torch.no_grad():
        for position, token in enumerate(caption.token_ids):
            # generation step by step, without a cache: the last query chooses the next token
            out = model.decoder(torch.tensor([ids]), context=context, return_attention=True)
            assert out.logits[0, -1].argmax().item() == token  # greedy
            for layer, weights in enumerate(out.cross_attentions):
                torch.testing.assert_close(
                    caption.cross_attentions[layer][0, :, position], weights[0, :, -1]
                )
            ids.append(token)


def test_errors_are_one_line(tiny_captioner, image_files, tmp_path, capsys):
    checkpoint, config = tiny_captioner
    folder, _ = image_files
    base = ["--checkpoint", str(checkpoint), "--config", str(config), "--out", str(tmp_path)]
    assert main([*base, "--images", str(folder), "--text", "a photo"]) == 2
    assert "--text needs a model that embeds images and texts" in capsys.readouterr().err
    assert main([*base, "--images", str(tmp_path / "missing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--images", str(folder), "--layer", "7"]) == 2
    assert "--layer 7: the image tower has 2 layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--images", str(folder), "--head", "first"])
