"""MedPLIB's tokenizer: special tokens, the one conversation template, and `<image>` expansion to patch tokens.

The tiny preset trains a byte-level BPE on the dataset's text; the full preset loads LLaVA's tokenizer from a
local folder. Either way the same template is used for training and for generation (the public MedPLIB code used
two different ones, a bug).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
IM_START, IM_END = "<im_start>", "<im_end>"
SEG_TOKEN = "<SEG>"
REGION_TOKEN = "<region>"
# MedPLIB's special tokens (REFERENCE §2); `<image>` is the placeholder each patch feature replaces.
SPECIAL_TOKENS = (SEG_TOKEN, "<ref>", "</ref>", REGION_TOKEN, "</region>", "<sr>", "</sr>", "<mask>", "</mask>",
                  IM_START, IM_END, IMAGE_TOKEN)
# The tokens the model's forward pass and generation rely on; later ones (a new task's) may be absent from an older
# saved tokenizer, which then still loads with its own vocabulary.
CORE_TOKENS = (IMAGE_TOKEN, IM_START, IM_END, SEG_TOKEN, REGION_TOKEN)
IGNORE_INDEX = -100
_SIDE_FILE = "medplib_tokenizer.json"


class MedTokenizer:
    """A transformers fast tokenizer plus MedPLIB's special tokens and conversation template."""

    def __init__(self, hf: PreTrainedTokenizerFast, num_image_tokens: int, system_prompt: str = "",
                 add_special_tokens: bool = True):
        """`add_special_tokens`: add MedPLIB's special tokens the vocabulary lacks (building a tokenizer). A saved
        MedTokenizer is loaded with False: its vocabulary is the one its model's embeddings were trained with."""
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens = {num_image_tokens}: the vision tower gives at least one patch")
        missing = [t for t in SPECIAL_TOKENS if t not in hf.get_vocab()]
        if missing and add_special_tokens:
            hf.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
        elif missing:
            core = [t for t in CORE_TOKENS if t in missing]
            if core:
                raise ValueError(f"The saved tokenizer lacks MedPLIB's core special tokens {core}: it was not "
                                 "saved by MedTokenizer")
        # the special tokens this vocabulary has: a task whose token is missing cannot be asked of this model
        self.special_tokens = tuple(t for t in SPECIAL_TOKENS if t in hf.get_vocab())
        if hf.eos_token is None:
            raise ValueError("The tokenizer has no end-of-sequence token; set `eos_token` before using it")
        if hf.pad_token is None:  # LLaMA has none; LLaVA pads with unk
            hf.pad_token = hf.unk_token if hf.unk_token is not None else hf.eos_token
        self.hf = hf
        self.num_image_tokens = num_image_tokens
        self.system_prompt = system_prompt
        ids = {t: hf.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        self.image_token_id, self.seg_token_id = ids[IMAGE_TOKEN], ids[SEG_TOKEN]
        self.region_token_id = ids[REGION_TOKEN]
        self.im_start_id, self.im_end_id = ids[IM_START], ids[IM_END]
        self.eos_token_id: int = hf.eos_token_id
        self.pad_token_id: int = hf.pad_token_id
        self.bos_token_id: int | None = hf.bos_token_id

    def __len__(self) -> int:
        return len(self.hf)

    # --- building -------------------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, num_image_tokens: int,
              system_prompt: str = "") -> "MedTokenizer":
        """Train a byte-level BPE on `texts` (tiny preset); special tokens are kept whole."""
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        base_special = ["<pad>", "<s>", "</s>"]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=base_special + list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        template = [f"{system_prompt} USER: ASSISTANT:"]  # the template's own words get merges too
        tok.train_from_iterator(list(texts) + template, trainer)
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                     additional_special_tokens=list(SPECIAL_TOKENS))
        return cls(hf, num_image_tokens, system_prompt)

    @classmethod
    def from_pretrained(cls, path: Path | str, num_image_tokens: int | None = None,
                        system_prompt: str | None = None) -> "MedTokenizer":
        """Load a saved MedTokenizer, or a plain HF tokenizer folder (LLaVA's) with the given template settings."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"Tokenizer folder {path} does not exist")
        side = path / _SIDE_FILE
        meta = json.loads(side.read_text(encoding="utf-8")) if side.exists() else {}
        n = num_image_tokens if num_image_tokens is not None else meta.get("num_image_tokens")
        if n is None:
            raise ValueError(f"{path} is not a saved MedTokenizer: pass num_image_tokens (the vision patch count)")
        system = system_prompt if system_prompt is not None else meta.get("system_prompt", "")
        hf = AutoTokenizer.from_pretrained(str(path))
        # a saved MedTokenizer is loaded as saved (never a token more: its model's embeddings fit it); a plain HF
        # folder (LLaVA's) gets MedPLIB's special tokens
        return cls(hf, n, system, add_special_tokens=not side.exists())

    def save_pretrained(self, path: Path | str) -> None:
        path = Path(path)
        self.hf.save_pretrained(str(path))
        (path / _SIDE_FILE).write_text(json.dumps({"num_image_tokens": self.num_image_tokens,
                                                   "system_prompt": self.system_prompt}, indent=1) + "\n",
                                       encoding="utf-8")

    # --- encoding -------------------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for i in self.hf.encode(text, add_special_tokens=False):
            if i == self.image_token_id:  # one placeholder per patch feature, framed like LLaVA's im_start/end
                ids += [self.im_start_id] + [self.image_token_id] * self.num_image_tokens + [self.im_end_id]
            else:
                ids.append(i)
        return ids

    def encode_prompt(self, question: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Token ids of the template up to the assistant's answer: exactly the training prefix."""
        ids, _ = self._encode_pairs(history)
        return ids + self._ids(self._question_text(question, first=not history))

    def encode_conversation(self, turns: Sequence[dict]) -> tuple[list[int], list[int]]:
        """Ids and labels of a MeCoVQA conversation; labels are IGNORE_INDEX everywhere but the answers."""
        if not turns or len(turns) % 2:
            raise ValueError(f"A conversation needs human/gpt pairs, got {len(turns)} turn(s)")
        pairs = []
        for k in range(0, len(turns), 2):
            human, gpt = turns[k], turns[k + 1]
            if human.get("from") != "human" or gpt.get("from") != "gpt":
                raise ValueError(f"Turns {k} and {k + 1} are from {human.get('from')!r} and {gpt.get('from')!r};"
                                 " expected 'human' then 'gpt'")
            pairs.append((human["value"], gpt["value"]))
        return self._encode_pairs(pairs)

    def _encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[int], list[int]]:
        ids = [self.bos_token_id] if self.bos_token_id is not None else []
        labels = [IGNORE_INDEX] * len(ids)
        for k, (question, answer) in enumerate(pairs):
            q = self._ids(self._question_text(question, first=k == 0))
            a = self._ids(" " + answer.strip()) + [self.eos_token_id]
            ids += q + a
            labels += [IGNORE_INDEX] * len(q) + a
        return ids, labels

    def _question_text(self, question: str, first: bool) -> str:
        head = (f"{self.system_prompt} " if self.system_prompt else "") if first else " "
        return f"{head}USER: {question} ASSISTANT:"

    def decode(self, ids: Sequence[int]) -> str:
        """Answer text from generated ids; special tokens such as `<SEG>` are kept, end and padding dropped."""
        keep = [i for i in ids if i not in (self.eos_token_id, self.pad_token_id)]
        text = self.hf.decode(keep, skip_special_tokens=False)
        return text.strip()
