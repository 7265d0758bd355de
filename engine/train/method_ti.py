"""Textual Inversion: new words in the tokenizers whose embedding rows are the only thing that learns.

As sd-scripts' train_textual_inversion.py: `num_vectors_per_token` tokens named `token`, `token1`, `token2`, ...
are added to every tokenizer (both for SDXL), each encoder's token-embedding matrix grows by that many rows,
initialised from `init_word`'s embedding (its tokens repeated or cut to the vector count; empty = "*"). The whole
embedding weight is handed to the optimizer, and after each update every other row is put back to its original
value, so the rest of the vocabulary, the encoders and the UNet stay exactly the base model.

Captions (see `caption_with_token`): the dataset's captions come through unchanged except that the token appears
in each of them, written out as all its vectors ("tok" -> "tok tok1 tok2").
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.networks.embedding_file import embedding_keys, save_embedding_file
from engine.train.setup import RunInputError

if TYPE_CHECKING:
    from engine.config.schema import RunConfig
    from engine.models.loaded_model import LoadedModel

PLACEHOLDER = "{}"
DEFAULT_INIT_WORD = "*"
_WORD_CHARACTER = "0-9A-Za-z_"


def token_strings(token: str, num_vectors: int) -> list[str]:
    """The added tokens, named as sd-scripts names them: token, token1, ..., token{n-1}."""
    return [token] + [f"{token}{index}" for index in range(1, num_vectors)]


def _token_pattern(token: str, num_vectors: int) -> re.Pattern[str]:
    """The token as a whole word, case-insensitively (CLIP's tokenizer lowercases), or already spelled out."""
    forms = dict.fromkeys((" ".join(token_strings(token, num_vectors)), token))  # the spelled-out form first
    words = "|".join(re.escape(form) for form in forms)
    return re.compile(rf"(?<![{_WORD_CHARACTER}])(?:{words})(?![{_WORD_CHARACTER}])", re.IGNORECASE)


def expand_token(text: str, token: str, num_vectors: int) -> str:
    """`text` with every ``{}``, else every whole-word token, written out as all the vectors ("tok tok1 tok2").

    sd-scripts does this to captions and sample prompts; text without the token is returned unchanged.
    """
    vectors = " ".join(token_strings(token, num_vectors))
    if PLACEHOLDER in text:
        return text.replace(PLACEHOLDER, vectors)
    return _token_pattern(token, num_vectors).sub(lambda _: vectors, text)


def caption_with_token(caption: str, token: str, num_vectors: int) -> str:
    """The caption with the token in it, written out as all its vectors.

    The rule, in order:

    1. every ``{}`` becomes the vectors ("a photo of {}" -> "a photo of tok tok1");
    2. otherwise every whole-word token becomes the vectors, as sd-scripts' replacement does (a caption that
       already spells the vectors out stays as it is);
    3. otherwise the vectors are put in front: "tok tok1, <caption>" (a caption without the token would teach
       nothing, e.g. DreamBooth-style folders whose class tokens name the subject another way).
    """
    if PLACEHOLDER in caption or _token_pattern(token, num_vectors).search(caption):
        return expand_token(caption, token, num_vectors)
    vectors = " ".join(token_strings(token, num_vectors))
    return f"{vectors}, {caption}" if caption.strip() else vectors


class TextualInversionMethod:
    """Trains the new token rows of every text encoder's input embedding (sd-scripts' TI, SD1/SD2/SDXL).

    All rows use `optimizer.learning_rate`, as sd-scripts' TI does (it has no per-part rates).
    """

    name = "textual_inversion"
    metadata_kind = "textual-inversion"
    trains_unet = False

    def __init__(self, config: RunConfig, model: LoadedModel, base_dir: Path):
        self.config = config
        section = config.embedding
        self.token = section.token_string
        self.num_vectors = section.num_vectors_per_token
        self.init_word = section.init_word or DEFAULT_INIT_WORD
        self.keys = embedding_keys(model.family)
        self.encoders = list(model.text.encoders)
        self.trains_text_encoders = [True] * len(self.encoders)
        strings = token_strings(self.token, self.num_vectors)
        self.token_ids = [add_tokens(tokenizer, encoder, strings, self.init_word)
                          for tokenizer, encoder in zip(model.text.tokenizers, self.encoders, strict=True)]
        # What every row must stay; the new rows' entries are never used (the trained values are kept instead).
        self._originals = [self._weight(index).detach().to(torch.float32, copy=True)
                           for index in range(len(self.encoders))]
        for encoder in self.encoders:
            encoder.get_input_embeddings().register_forward_hook(_rows_in_cpu_autocast_dtype)

    def _weight(self, index: int) -> torch.nn.Parameter:
        return self.encoders[index].get_input_embeddings().weight

    def prepare_captions(self, captions: list[str]) -> list[str]:
        return [caption_with_token(caption, self.token, self.num_vectors) for caption in captions]

    def prepare_prompt(self, prompt: str) -> str:
        """Sample prompts name the token once; it stands for all of its vectors (as sd-scripts expands it)."""
        return expand_token(prompt, self.token, self.num_vectors)

    def after_update(self) -> None:
        """Put every row but the new ones back (the optimizer moved them: gradients, weight decay, momentum)."""
        with torch.no_grad():
            for index, ids in enumerate(self.token_ids):
                weight = self._weight(index)
                if self._originals[index].device != weight.device:
                    self._originals[index] = self._originals[index].to(weight.device)  # once, after place_models
                trained = weight[ids].clone()
                weight.copy_(self._originals[index])
                weight[ids] = trained

    def param_groups(self) -> list[dict]:
        names = ["embedding"] if len(self.keys) == 1 else [f"embedding_{key}" for key in self.keys]
        rate = self.config.optimizer.learning_rate
        return [{"params": [self._weight(index)], "lr": rate, "name": name} for index, name in enumerate(names)]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self._weight(index) for index in range(len(self.encoders))]

    def trainable_modules(self) -> list[torch.nn.Module]:
        return [encoder.get_input_embeddings() for encoder in self.encoders]

    def embeddings(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The new rows by file key ("emb_params", or "clip_l" and "clip_g"), each [num_vectors, dim]."""
        return {key: self._weight(index).detach()[ids].to("cpu", dtype or torch.float32)
                for index, (key, ids) in enumerate(zip(self.keys, self.token_ids, strict=True))}

    def trained_state(self) -> dict[str, torch.Tensor]:
        return self.embeddings(torch.float32)

    def load_trained_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for index, (key, ids) in enumerate(zip(self.keys, self.token_ids, strict=True)):
                weight = self._weight(index)
                rows = tensors[key]
                if tuple(rows.shape) != (len(ids), weight.shape[1]):
                    raise RunInputError(f"the saved state's embedding {key!r} is {tuple(rows.shape)}, this run's is "
                                        f"{(len(ids), weight.shape[1])}", "resume with the same embedding settings "
                                        "and base model", "saving.resume")
                weight[ids] = rows.to(weight.device, weight.dtype)

    def save(self, path_without_suffix: Path, metadata: dict[str, str]) -> Path:
        from engine.networks.network_file import save_dtype

        step = metadata.get("ss_steps")
        return save_embedding_file(path_without_suffix, self.embeddings(save_dtype(self.config.saving.save_precision)),
                                   metadata, save_as=self.config.saving.save_model_as, name=self.token,
                                   step=int(step) if step and step.isdigit() else None)

    def describe(self) -> str:
        vectors = ", ".join(token_strings(self.token, self.num_vectors))
        return (f"embedding {self.token!r}: {self.num_vectors} vector(s) ({vectors}) in {len(self.encoders)} "
                f"text encoder(s), initialised from {self.init_word!r}")


def _rows_in_cpu_autocast_dtype(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """The trained embedding is float32 while the rest of its encoder is kept in the half dtype. On a GPU, autocast
    runs the layer norms that follow in float32, whatever their inputs; the CPU's autocast leaves layer norms alone,
    and one with a float32 input and float16 weights fails. There the embeddings enter the encoder in its dtype."""
    if output.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return output.to(torch.get_autocast_dtype("cpu"))
    return output


def add_tokens(tokenizer: Any, encoder: Any, strings: list[str], init_word: str) -> list[int]:
    """Add `strings` to the tokenizer, grow the encoder's embedding, copy init_word's rows in; returns the new ids.

    Raises:
        RunInputError: a string the tokenizer already knows, or an init word that gives no tokens.
    """
    init_ids = tokenizer.encode(init_word, add_special_tokens=False)
    if not init_ids:
        raise RunInputError(f"embedding.init_word {init_word!r} gives no tokens", "use an ordinary word such as "
                            "'person' or 'dog'", "embedding.init_word")
    for text in strings:
        refuse_known_word(tokenizer, text)
    first_new = len(tokenizer)
    tokenizer.add_tokens(strings)
    ids = tokenizer.convert_tokens_to_ids(strings)
    if sorted(ids) != list(range(first_new, first_new + len(strings))):
        raise RunInputError(f"the tokenizer did not add {strings} as new words (ids {ids})",
                            "choose another embedding.token_string", "embedding.token_string")
    rows = max(len(tokenizer), encoder.get_input_embeddings().num_embeddings)
    encoder.resize_token_embeddings(rows, mean_resizing=False)  # the new rows are overwritten just below
    with torch.no_grad():
        weight = encoder.get_input_embeddings().weight
        for position, token_id in enumerate(ids):
            # sd-scripts: an init word of several tokens is repeated or cut to the number of vectors.
            weight[token_id] = weight[init_ids[position % len(init_ids)]]
    return ids


def refuse_known_word(tokenizer: Any, text: str) -> None:
    """A new token must be a word the tokenizer does not know, or it would change every prompt that uses the word.

    Known means: in the vocabulary as it is (including tokens added before), or read as one existing token
    ("dog" is "dog</w>"); adding such a string would make the tokenizer map the word to the new embedding.
    """
    where = "embedding.token_string"
    if not text:
        raise RunInputError("embedding.token_string is empty", "set the new word to train, e.g. 'mychar'", where)
    hint = "choose a made-up word that is not in the vocabulary, e.g. 'zq' followed by your concept's name"
    if text in tokenizer.get_vocab():
        raise RunInputError(f"{text!r} is already in the tokenizer's vocabulary, so it cannot be a new token", hint,
                            where)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) == 1:
        known = tokenizer.convert_ids_to_tokens(ids)[0]
        raise RunInputError(f"{text!r} is already a word the tokenizer knows (token {known!r}, id {ids[0]}), so it "
                            "cannot be a new token", hint, where)
