"""Training-step time (forward, CLIP loss, backward, AdamW step, zero_grad) of our CLIP (vision.ViT
+ text.TextEncoder) vs open_clip's CLIP with the same architecture, fp32 and bf16-mixed, measured
in the same run (interleaved, median of repeats after warm-up); never a timed test.

    python bench/clip_step.py [--batch 32] [--repeats 7] [--threads 2] [--clock wall|cpu]

On a machine shared with other work, `--threads 1 --clock cpu` (process CPU time of one
thread) is nearly blind to the other processes; with several threads CPU time also counts the
threads' spin-waiting, so read wall time there.

Both models: ViT-B/32-like image tower (pre-norm blocks, a norm before them as OpenAI's
ln_pre, class-token pooling, no patch bias) and a causal text tower with learned positions
and end-of-text pooling, GELU in both (open_clip `quick_gelu: false`), LayerNorm eps 1e-5,
bias-free projections to the joint space. Ours gets the attention mask as in training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
from torch import Tensor, nn

from multimodal.layers import TransformerConfig
from multimodal.models import CLIP
from multimodal.models.losses import clip_loss
from text import TextConfig, TextEncoder, load_tokenizer
from text.text_encoder import OPEN_CLIP_BLOCK_RENAMES
from vision import ViT, ViTConfig

IMAGE = {"image_size": 224, "patch_size": 32, "width": 256, "layers": 6, "heads": 4}
TEXT = {"context_length": 77, "vocab_size": 49408, "width": 256, "layers": 4, "heads": 4}
EMBED_DIM = 256
NAME = "bench-clip-step"
PRECISIONS = {"fp32": None, "bf16-mixed": torch.bfloat16}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def build_open_clip() -> nn.Module:
    config = {
        "embed_dim": EMBED_DIM,
        "quick_gelu": False,
        "vision_cfg": {
            "image_size": IMAGE["image_size"],
            "patch_size": IMAGE["patch_size"],
            "width": IMAGE["width"],
            "layers": IMAGE["layers"],
            "head_width": IMAGE["width"] // IMAGE["heads"],
        },
        "text_cfg": TEXT,
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{NAME}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)
    return open_clip.create_model(NAME)


def build_ours() -> CLIP:
    image = ViT(
        ViTConfig(
            image_size=IMAGE["image_size"],
            patch_size=IMAGE["patch_size"],
            dim=IMAGE["width"],
            n_layers=IMAGE["layers"],
            n_heads=IMAGE["heads"],
            pool="token",
            pre_norm=True,
            patch_bias=False,
            norm_eps=1e-5,
        )
    )
    text = TextEncoder(
        TextConfig(
            vocab_size=TEXT["vocab_size"],
            transformer=TransformerConfig(
                dim=TEXT["width"],
                n_layers=TEXT["layers"],
                n_heads=TEXT["heads"],
                causal=True,
                position="learned",
                max_positions=TEXT["context_length"],
                activation="gelu",
                norm_eps=1e-5,
            ),
        ),
        pool="eot",
    )
    return CLIP(image, text, EMBED_DIM)


TOP_RENAMES = {
    "logit_scale": "logit_scale",
    "visual.class_embedding": "image_tower.cls_token",
    "visual.positional_embedding": "image_tower.pos_embed",
    "visual.conv1.weight": "image_tower.patch_embed.proj.weight",
    "visual.ln_pre.": "image_tower.pre_norm.",
    "visual.ln_post.": "image_tower.encoder.norm.",
    "visual.transformer.resblocks.": "image_tower.encoder.blocks.",
    "token_embedding.weight": "text_tower.embed.token.weight",
    "positional_embedding": "text_tower.transformer.position_embedding.weight",
    "ln_final.": "text_tower.transformer.norm.",
    "transformer.resblocks.": "text_tower.transformer.blocks.",
}
PROJECTIONS = {
    "visual.proj": "image_projection.weight",
    "text_projection": "text_projection.weight",
}


def copy_open_clip_weights(theirs: nn.Module, ours: CLIP) -> None:
    """Load open_clip's weights into ours (strictly): the proof that the architectures match."""
    target = ours.state_dict()
    state = {}
    for name, tensor in theirs.state_dict().items():
        if name in PROJECTIONS:  # open_clip multiplies x @ proj; ours is a Linear
            state[PROJECTIONS[name]] = tensor.T
            continue
        old = next(o for o in sorted(TOP_RENAMES, key=len, reverse=True) if name.startswith(o))
        new = TOP_RENAMES[old] + name[len(old) :]
        for before, after in OPEN_CLIP_BLOCK_RENAMES.items():
            new = new.replace(before, after)
        state[new] = tensor.reshape(target[new].shape)  # class token (D,) -> (1, 1, D)
    ours.load_state_dict(state, strict=True)


def captions(batch: int) -> list[str]:
    """Captions of 3 to 40 words, so that end-of-text falls at many positions."""
    words = ("a", "photo", "of", "the", "small", "red", "cat", "on", "an", "old", "wooden", "chair")
    return [" ".join(words[j % len(words)] for j in range(3 + (7 * i) % 38)) for i in range(batch)]


def make_step(
    forward: Callable[[], tuple[Tensor, Tensor, Tensor]],
    model: nn.Module,
    clock: Callable[[], float],
) -> Callable[[torch.dtype | None], float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step(dtype: torch.dtype | None) -> float:
        start = clock()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            image, text, scale = forward()
            loss = clip_loss(image.float(), text.float(), scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return clock() - start

    return step


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ours, theirs = build_ours().train(), build_open_clip().train()
    images = torch.randn(args.batch, 3, IMAGE["image_size"], IMAGE["image_size"])
    tokens = load_tokenizer("clip").batch_encode(
        captions(args.batch), max_length=TEXT["context_length"], padding="max_length"
    )  # equal to open_clip.tokenize: (B, 77), zero-padded

    copy_open_clip_weights(theirs, ours)
    with torch.no_grad():
        out = ours(images[:4], tokens.input_ids[:4], tokens.attention_mask[:4])
        image, text, _ = theirs(images[:4], tokens.input_ids[:4])
    parity = max((out.image_features - image).abs().max(), (out.text_features - text).abs().max())

    def our_forward() -> tuple[Tensor, Tensor, Tensor]:
        out = ours(images, tokens.input_ids, tokens.attention_mask)
        return out.image_features, out.text_features, out.logit_scale

    def their_forward() -> tuple[Tensor, Tensor, Tensor]:
        image, text, scale = theirs(images, tokens.input_ids)
        return image, text, scale.clamp(max=100.0)

    clock = CLOCKS[args.clock]
    our_step = make_step(our_forward, ours, clock)
    their_step = make_step(their_forward, theirs, clock)
    print(
        f"CLIP training step (fwd + loss + bwd + AdamW + zero_grad), batch {args.batch}, CPU, "
        f"torch {torch.__version__}, open_clip {open_clip.__version__}, "
        f"{torch.get_num_threads()} threads, {args.clock} clock"
    )
    print(
        f"image: {IMAGE}; text: {TEXT}; embed {EMBED_DIM}; "
        f"parameters ours {n_params(ours):,}, open_clip {n_params(theirs):,}; "
        f"with open_clip's weights copied in, max |ours - open_clip| embedding = {parity:.1e}"
    )
    print(f"{'precision':<11} {'ours ms':>9} {'open_clip ms':>13} {'ours/open_clip':>15}")
    medians = {}
    for label, dtype in PRECISIONS.items():
        for _ in range(args.warmup):
            our_step(dtype)
            their_step(dtype)
        ours_t, theirs_t = [], []
        for _ in range(args.repeats):  # interleaved so that drifts in machine speed hit both
            ours_t.append(our_step(dtype))
            theirs_t.append(their_step(dtype))
        medians[label] = statistics.median(ours_t), statistics.median(theirs_t)
        o, t = medians[label]
        print(f"{label:<11} {o * 1e3:>9.1f} {t * 1e3:>13.1f} {o / t:>15.3f}")
    speedup = medians["fp32"][0] / medians["bf16-mixed"][0]
    print(f"ours: bf16-mixed is {speedup:.2f}x the speed of fp32")


if __name__ == "__main__":
    main()
