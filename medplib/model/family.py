"""Model families as plug-ins: a family is its model class, the format its saved folders declare, its stage plan,
its training recipe, the registered-model name and the gate metric. One `load_pretrained(folder)` loads whatever a
saved folder says it is (as transformers' AutoModel dispatches on `model_type`).

A new family is one module that calls `register_family` when imported and is named in `FAMILY_MODULES`, so the
registry knows where to find it without importing every family up front.
"""
from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"  # every family's saved folder has one, with a "format" key naming the family's format

# family name → the module that registers it (imported on first use)
FAMILY_MODULES = {"medplib": "medplib.model.model", "reclmis": "medplib.model.reclmis"}
MEDPLIB_PLAN = "medplib.train.runner:MedPLIBPlan"  # MedPLIB's stages: the config's top-level `model` and `train`


@dataclass(frozen=True)
class ModelFamily:
    name: str  # what --model names
    model_class: Any  # has from_pretrained(folder) and save_pretrained(folder)
    format: str  # config.json's "format" in the family's saved folders
    stages: tuple[int, ...]  # the stage plan: train.stage<N> of the config, trained in this order
    recipe: str  # "module:Class" of the Ray Train worker recipe that trains a stage
    registered_model: str  # the default MLflow registered-model name (mlflow.yaml's registered_model overrides)
    gate_metric: str  # the default primary metric of the promotion gate (mlflow.yaml's gate.primary_metric)
    # The tasks (names or groups) it reads and is evaluated on; None: every registered task. Evaluation reads only
    # these, and the gate's floors on other tasks' metrics do not apply to it.
    tasks: tuple[str, ...] | None = None
    # Its own config section (`families.<name>` of the config, over `settings.preset(preset_name)`): a dataclass with
    # `model` and `train` (whose `stages()` gives a StageSpec per stage). None: the config's top-level `model` and
    # `train`, MedPLIB's.
    settings: Any = None
    plan: str = MEDPLIB_PLAN  # "module:Class" of the driver's stage plan (medplib.train.runner.StagePlan)
    # The served pyfunc's input example besides its image (the request columns it shows); None: MedPLIB's, a
    # question about a point prompt.
    example_request: dict | None = None
    # What its first champion must reach (metric → minimum) where mlflow.yaml's `gate.floor` names no floor for it.
    floor: dict | None = None


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a family; a second family with the same name or format is an error (two would claim one folder)."""
    for other in _FAMILIES.values():
        if other.name != family.name and other.format == family.format:
            raise ValueError(f"Model family {family.name!r} declares format {family.format!r}, already that of "
                             f"{other.name!r}")
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    _FAMILIES.pop(name, None)


def get_family(name: str) -> ModelFamily:
    """The family `name` (`--model NAME`), importing its module on first use."""
    if name not in _FAMILIES and name in FAMILY_MODULES:
        importlib.import_module(FAMILY_MODULES[name])
    if name not in _FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; known: {', '.join(family_names())}")
    return _FAMILIES[name]


def family_names() -> list[str]:
    return sorted(set(_FAMILIES) | set(FAMILY_MODULES))


def family_of(folder: Path | str) -> ModelFamily:
    """The family a saved folder belongs to, from the "format" in its config.json."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a saved model folder")
    try:
        fmt = json.loads(path.read_text(encoding="utf-8")).get("format")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path} is not a model config (JSON object with a 'format' key): {e}") from None
    for name in family_names():
        family = get_family(name)
        if family.format == fmt:
            return family
    raise ValueError(f"{path}: format {fmt!r} belongs to no model family (known formats: "
                     f"{', '.join(get_family(n).format for n in family_names())})")


def family_of_model(model: Any) -> ModelFamily:
    """The family a loaded model belongs to (an instance of its model class)."""
    for name in family_names():
        family = get_family(name)
        if isinstance(model, family.model_class):
            return family
    raise ValueError(f"{type(model).__name__} is the model class of no model family ({', '.join(family_names())})")


def generate_takes(model: Any, keyword: str) -> bool:
    """Whether `model.generate` takes `keyword`: what a family's model can be handed (in-context images shown in the
    prompt, `contexts`; the example pairs themselves, for a mask decoder that reads them, `examples`)."""
    return keyword in inspect.signature(model.generate).parameters


def load_pretrained(folder: Path | str, family: str | None = None):
    """Load whatever model a saved folder says it is; with `family` (--model NAME), the folder must be that
    family's, or a ValueError says whose it is."""
    found = family_of(folder)
    if family is not None and found.name != family:
        raise ValueError(f"{folder} holds a model of family {found.name!r} (format {found.format!r}), not of "
                         f"{get_family(family).name!r}: pass --model {found.name}, or a model of family {family!r}")
    return found.model_class.from_pretrained(folder)
