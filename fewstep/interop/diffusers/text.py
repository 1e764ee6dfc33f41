"""Text encoders of diffusers pipelines (from `transformers`): prompts -> the network contract's text
conditioning `{"text": (B, L, D), "text_mask": (B, L)}`.

    encoder = PromptEncoder("path/to/sd-pipeline")        # its tokenizer/ and text_encoder/
    cond = encoder.cond(["a handwritten digit three"])
    table = cached_prompt_table("path/to/sd-pipeline", dataset.prompts)   # encoded once, cached

The encoder is what the pipeline itself uses: CLIP's last hidden state (SD 1.x/2.x, PixArt-style
models with a CLIP encoder) or T5's encoder output with its attention mask (PixArt). Classes are
named in `model_index.json` and looked up in `TEXT_ENCODERS` / `TOKENIZERS` only; weights are read
from safetensors only. Encoded tables are cached under fewstep's cache folder, keyed by the SHA-256
of the encoder's config, tokenizer files and weights and by the prompts, so a changed encoder is
encoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from fewstep.data.prompts import PromptTable
from fewstep.interop.diffusers.pretrained import PretrainedError, resolve_pretrained

TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast")
RECORD_KEY = "fewstep_prompts"


def _component(index: dict, key: str, root: Path, allowed: tuple[str, ...]) -> tuple[str, Path]:
    entry = index.get(key)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
        raise PretrainedError(f"{root}: the pipeline has no {key} (model_index.json), so it cannot encode prompts; "
                              f"pass a text-to-image pipeline")
    if entry[1] not in allowed:
        raise PretrainedError(f"{root}: {key} class {entry[1]!r} is not supported; supported: {', '.join(allowed)}")
    if not (root / key).is_dir():
        raise PretrainedError(f"{root}: model_index.json names a {key} but there is no {key}/ folder")
    return entry[1], root / key


class PromptEncoder:
    """The tokenizer and text encoder of a pipeline folder or Hub id, frozen, in eval mode."""

    def __init__(self, spec: str | os.PathLike, device: str | torch.device = "cpu"):
        import transformers

        self.spec = str(spec)
        root = resolve_pretrained(spec)
        index_path = root / "model_index.json"
        if not index_path.exists():
            raise PretrainedError(f"{root}: not a pipeline folder (no model_index.json), so no text encoder")
        index = json.loads(index_path.read_text())
        tok_name, self.tokenizer_dir = _component(index, "tokenizer", root, TOKENIZERS)
        enc_name, self.encoder_dir = _component(index, "text_encoder", root, TEXT_ENCODERS)
        try:
            self.tokenizer = getattr(transformers, tok_name).from_pretrained(str(self.tokenizer_dir))
        except (OSError, ValueError, TypeError) as e:
            raise PretrainedError(f"{self.tokenizer_dir}: cannot load the {tok_name} ({' '.join(str(e).split())[:200]})") from None
        if not list(self.encoder_dir.glob("*.safetensors")):
            raise PretrainedError(f"{self.encoder_dir}: no safetensors weights (fewstep reads no pickled weights)")
        try:
            self.model = getattr(transformers, enc_name).from_pretrained(str(self.encoder_dir), use_safetensors=True)
        except (OSError, ValueError, TypeError) as e:
            raise PretrainedError(f"{self.encoder_dir}: cannot load the {enc_name} ({' '.join(str(e).split())[:200]})") from None
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.t5 = enc_name.startswith("T5")
        # PixArt's pipelines lowercase and strip each prompt before T5 (their `clean_caption` does more,
        # with optional libraries; on plain prompts it comes to the same)
        self.lowercase = str(index.get("_class_name", "")).startswith("PixArt")
        self.max_length = self._check_match()

    def _check_match(self) -> int:
        """The token length prompts are padded to; a tokenizer that does not fit the encoder is an error."""
        cfg = self.model.config
        if len(self.tokenizer) > cfg.vocab_size:
            raise PretrainedError(f"{self.tokenizer_dir}: the tokenizer has {len(self.tokenizer)} tokens but the text "
                                  f"encoder embeds {cfg.vocab_size}: they do not belong together")
        length = int(self.tokenizer.model_max_length)
        positions = getattr(cfg, "max_position_embeddings", None)
        if positions is not None:
            if length > positions:
                raise PretrainedError(f"{self.tokenizer_dir}: the tokenizer pads to {length} tokens but the text "
                                      f"encoder has {positions} positions: they do not belong together")
        elif length > 4096:  # T5 (relative positions) with no length set: PixArt's 120
            length = 120
        return length

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens of each prompt, with the special tokens."""
        return [len(ids) for ids in self.tokenizer(self._prepared(prompts)).input_ids]

    def _prepared(self, prompts) -> list[str]:
        return [p.lower().strip() for p in prompts] if self.lowercase else list(prompts)

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """(text (P, L, D) float32, mask (P, L) int64) on the CPU, as the pipeline encodes prompts."""
        device = next(self.model.parameters()).device
        texts, masks = [], []
        for i in range(0, len(prompts), batch_size):
            tok = self.tokenizer(self._prepared(prompts[i:i + batch_size]), padding="max_length",
                                 max_length=self.max_length, truncation=True, return_tensors="pt")
            ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
            # SD's pipelines run CLIP without the mask (its causal attention ends at the EOS); T5 with it.
            out = self.model(ids, attention_mask=mask if self.t5 else None)[0]
            texts.append(out.float().cpu())
            masks.append(mask.cpu().long())
        return torch.cat(texts), torch.cat(masks)

    def cond(self, prompts: list[str], device=None) -> dict[str, torch.Tensor]:
        text, mask = self.encode(prompts)
        return {"text": text.to(device), "text_mask": mask.to(device)}

    def table(self, prompts: list[str]) -> PromptTable:
        text, mask = self.encode(list(prompts) + [""])
        return PromptTable(list(prompts), text[:-1], mask[:-1], text[-1], mask[-1])

    def fingerprint(self) -> str:
        """SHA-256 of everything that decides the embeddings: config, tokenizer files, weights."""
        digest = hashlib.sha256()
        for folder in (self.tokenizer_dir, self.encoder_dir):
            for f in sorted(p for p in folder.rglob("*") if p.is_file()):
                digest.update(f.relative_to(folder).as_posix().encode() + b"\0")
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 24), b""):
                        digest.update(chunk)
        return digest.hexdigest()


def prompt_cache_dir() -> Path:
    """Where encoded prompt tables are kept, beside the encoded latents ($FEWSTEP_CACHE)."""
    return Path(os.environ.get("FEWSTEP_CACHE", Path.home() / ".cache" / "fewstep")) / "latents"


def cached_prompt_table(spec: str | os.PathLike, prompts: list[str], device: str | torch.device = "cpu",
                        progress: bool = False) -> tuple[PromptTable, Path]:
    """The `PromptTable` of `prompts` under the text encoder of `spec`: read from the cache, or
    encoded now and cached (keyed by the encoder's fingerprint and the prompts)."""
    from safetensors.torch import load_file, save_file

    encoder = PromptEncoder(spec, device)
    key = hashlib.sha256(json.dumps([encoder.fingerprint(), encoder.max_length, encoder.lowercase,
                                     list(prompts)]).encode())
    path = prompt_cache_dir() / f"prompts-{key.hexdigest()[:20]}.safetensors"
    if path.exists():
        t = load_file(str(path))
        return PromptTable(list(prompts), t["text"], t["mask"], t["null_text"], t["null_mask"]), path
    if progress:
        print(f"encoding {len(prompts)} prompts with the text encoder of {spec} -> {path}")
    table = encoder.table(prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {"text": table.text, "mask": table.mask, "null_text": table.null_text, "null_mask": table.null_mask}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={RECORD_KEY: json.dumps({"encoder": str(spec), "count": len(prompts)})})
    os.replace(tmp, path)
    return table, path


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """The prompts of a text file, one per line (blank lines skipped); one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--prompts {path}: no such file")
    try:
        lines = p.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {path}: not UTF-8 text (byte {e.start})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts (one prompt per line)")
    return prompts


def check_prompt_lengths(encoder: PromptEncoder, prompts: list[str], where: str = "--prompt") -> None:
    """A prompt longer than the encoder reads would be cut silently: say which, in one line."""
    for i, n in enumerate(encoder.token_counts(prompts)):
        if n > encoder.max_length:
            raise ValueError(f"{where}: prompt {i + 1} ({prompts[i][:40]!r}...) has {n} tokens; the text encoder "
                             f"reads at most {encoder.max_length}")


__all__ = ["PromptEncoder", "TEXT_ENCODERS", "TOKENIZERS", "cached_prompt_table", "check_prompt_lengths",
           "read_prompt_file"]
