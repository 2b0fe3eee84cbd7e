"""The MedPLIB model: vision tower, projector, pixel prompts → region tokens, grounding head, MoE, tokenizer."""
from medplib.model.family import ModelFamily, get_family, load_pretrained, register_family
from medplib.model.loaders import build_model, load_tokenizer
from medplib.model.losses import LossWeights, dice_score
from medplib.model.model import Generation, MedPLIB, MedPLIBOutput, parameter_counts
from medplib.model.moe import MoEFeedForward, upcycle
from medplib.model.prompts import PromptError, box_prompt_mask, freeform_prompt_mask, point_prompt_mask
from medplib.model.tokenizer import SPECIAL_TOKENS, MedTokenizer

__all__ = [
    "Generation", "LossWeights", "MedPLIB", "MedPLIBOutput", "MedTokenizer", "MoEFeedForward", "ModelFamily",
    "PromptError", "get_family", "load_pretrained", "register_family",
    "SPECIAL_TOKENS", "box_prompt_mask", "build_model", "dice_score", "freeform_prompt_mask", "parameter_counts",
    "load_tokenizer", "point_prompt_mask", "upcycle",
]
