"""A text-to-image distillation you can run offline in a minute: a tiny random Stable Diffusion
pipeline (CLIP text encoder, UNet2DConditionModel, AutoencoderKL) and captioned digits.

    python examples/tiny_text_to_image.py tiny            # writes tiny/sd-pipeline and tiny/digits
    fewstep train --method scd --teacher tiny/sd-pipeline --data tiny/digits \\
        --set data.vae=tiny/sd-pipeline --set method.guidance=2 --steps 20 --out tiny/run
    fewstep sample tiny/run --prompt "a handwritten digit three" --steps 1 --num 16
    fewstep export tiny/run --out tiny/scd-pipeline     # a StableDiffusionPipeline with an LCMScheduler

`tiny_pixart_pipeline` writes the same for a PixArt-style transformer with a T5 text encoder
(`python examples/tiny_text_to_image.py tiny pixart`); its student exports as a `PixArtAlphaPipeline`.

The models are random, so the images are noise: this shows the commands and the files, not quality.
With a real pipeline (a folder or a Hub id such as an SD 1.5 checkpoint) the commands are the same.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def tiny_tokenizer(folder: Path):
    """A CLIP tokenizer over single letters, written by hand (no download)."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(letters)})
    vocab.update({c + "</w>": i + 2 + len(letters) for i, c in enumerate(letters)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32)


def tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """A random StableDiffusionPipeline for 8x8 grey images (4x4x4 latents), saved to `folder`."""
    import diffusers
    import torch
    import transformers

    folder = Path(folder)
    tokenizer = tiny_tokenizer(folder.parent / "tokenizer-files")
    torch.manual_seed(seed)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = diffusers.UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8)
    diffusers.StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_t5_tokenizer():
    """A T5 tokenizer over single letters (a Unigram model written by hand, no download)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    pieces = ["<pad>", "</s>", "<unk>", "\u2581", *"abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram([(p, 0.0 if p.startswith("<") else -1.0) for p in pieces], unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                        extra_ids=0, model_max_length=32)


def tiny_pixart_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """A random PixArtAlphaPipeline (T5 text encoder, PixArtTransformer2DModel with PixArt's learned
    variance channels, AutoencoderKL) for 8x8 grey images, saved to `folder`."""
    import diffusers
    import torch
    import transformers

    folder = Path(folder)
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))
    transformer = diffusers.PixArtTransformer2DModel(
        sample_size=4, in_channels=4, out_channels=8, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        caption_channels=32, cross_attention_dim=16, patch_size=2, use_additional_conditions=False)
    diffusers.PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=_tiny_vae(), transformer=transformer,
        scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder, safe_serialization=True)
    return folder


def _tiny_vae():
    import diffusers

    return diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=8)


def captioned_digits(folder: str | Path, count: int = 200) -> Path:
    """`count` of scikit-learn's 8x8 digits as PNGs with a Hugging Face imagefolder metadata.jsonl
    ("a handwritten digit three")."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rows = []
    for i in range(count):
        name = f"{i:05d}.png"
        Image.fromarray((digits.images[i] * 255 / 16).round().astype(np.uint8)).save(folder / name)
        rows.append(json.dumps({"file_name": name, "text": f"a handwritten digit {NUMBERS[digits.target[i]]}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny")
    if sys.argv[2:] == ["pixart"]:
        print(f"wrote {tiny_pixart_pipeline(root / 'pixart-pipeline')} and {captioned_digits(root / 'digits')}")
    else:
        print(f"wrote {tiny_pipeline(root / 'sd-pipeline')} and {captioned_digits(root / 'digits')}")
