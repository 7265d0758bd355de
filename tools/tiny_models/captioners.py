"""Tiny BLIP and GIT captioning models with processors, saved as ordinary transformers folders.

The image processors are the PIL ones on purpose: transformers 5 defaults to torchvision-backed processors, and
torchvision is not (and must not be) installed here. Saving the PIL class into ``processor_config.json`` makes
``AutoProcessor.from_pretrained`` load it back without the torchvision fallback warning.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_models.vocab import write_bert_vocab

_IMAGE_SIZE = 32  # 4×4 patches of 8 px: the smallest ViT that still looks like one
_VISION = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": _IMAGE_SIZE,
    "patch_size": 8,
}
_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}


def _bert_tokenizer(folder: Path, **special_tokens: str):
    from transformers import BertTokenizer

    vocab = write_bert_vocab(folder / "vocab.txt")
    return BertTokenizer(vocab=str(vocab), do_lower_case=True, **special_tokens)


def write_blip(folder: Path, seed: int = 400) -> None:
    """Save a ``BlipForConditionalGeneration`` + ``BlipProcessor`` into ``folder``."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    # BLIP's decoder starts from a dedicated [DEC] token and stops at [SEP].
    tokenizer = _bert_tokenizer(folder, bos_token="[DEC]")
    text_config = {
        **_TEXT,
        "vocab_size": len(tokenizer),
        "encoder_hidden_size": _VISION["hidden_size"],
        "bos_token_id": tokenizer.bos_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = BlipConfig(vision_config=_VISION, text_config=text_config, projection_dim=32)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    image_processor = BlipImageProcessorPil(size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))


def write_git(folder: Path, seed: int = 500) -> None:
    """Save a ``GitForCausalLM`` + ``GitProcessor`` into ``folder``."""
    from transformers import CLIPImageProcessorPil, GitConfig, GitForCausalLM, GitProcessor

    tokenizer = _bert_tokenizer(folder)
    # GIT starts from [CLS] and stops at [SEP] (microsoft/git-* use BERT's tokenizer the same way).
    config = GitConfig(
        vision_config=_VISION,
        **_TEXT,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GitForCausalLM(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": _IMAGE_SIZE}, crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    )
    processor = GitProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
