"""The task room: one module per task, each registering a `Task`; consumers loop over the registry.

A task says what its records look like (the check ingest and the GX suite share, and how many context images a
record may carry: in-context examples, other views), where they live in the
MeCoVQA layout, what the synthetic generator writes for it (and the DICOM/NIfTI readers for a labelled slice),
how one generation is scored and how scores aggregate (a `Cumulative`: per-sample buffers, then `aggregate()`),
its headline metrics and its generation length. Nothing outside this package names a concrete task; stage data mixes name tasks or groups.
Adding a task: a module here with a `Task` subclass and `register(...)`, imported at the bottom of this file
(or, for a plug-in or a test, `register` from anywhere and `unregister` when done).
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:
    from medplib.data.readers.dicom import LabelledSlice
    from medplib.data.schema import Record
    from medplib.data.synth import Scene

# MeCoVQA's split folders for annotation files; zero-shot images sit under zeroshot4grounding/ (grounding only).
TRAIN_TEST = ("train", "test")


class Cumulative:
    """Per-sample buffers per modality, then `aggregate()`: {modality: {metric: value, "n": count}, "all": {...}}.

    The default is MedPLIB's per-sample mean (`aggregate_by_modality`); a corpus metric (BLEU over the corpus,
    CIDEr) overrides `aggregate` and reads the buffered rows, which carry `prediction` and `reference`.
    """

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def append(self, row: dict) -> None:
        """One scored sample: its `modality`, metric values, and any text fields (ignored by the mean)."""
        self.rows.append(dict(row))

    def aggregate(self) -> dict[str, dict[str, float]]:
        from medplib.eval.metrics import aggregate_by_modality

        return aggregate_by_modality(self.rows)


class Task:
    """One task. Subclasses set the class attributes and override what differs from these defaults."""

    name: str = ""
    groups: tuple[str, ...] = ()  # what stage data mixes select (`tasks=("vl",)` takes every task of group vl)
    family: str = ""  # the MeCoVQA annotation-file family holding its records (Complex, Region, …)
    file_words: tuple[str, ...] = ()  # words in an annotation file name that mean `family` (default: family)
    files: dict[str, str] = {}  # split → annotation file the synthetic generator writes (default from family)
    answer_type: str | None = None  # when several tasks share a family, the answer type that picks this one
    zeroshot: bool = False  # also asked on zero-shot images (written under zeroshot4grounding/)
    max_new_tokens: int = 24  # generation length when evaluated
    summary: dict[str, tuple[str, str]] = {}  # headline metric name → (split, metric of this task's table)
    headline: str | None = None  # the summary key the promotion gate guards (default: its first on the test split)
    ranges: dict[str, float] = {}  # summary key → its metric's full range when not [0, 1] (CIDEr: 10)
    max_context: int = 0  # context images (with optional masks) a record may carry besides its query image
    # Its context pairs are examples of the mask to produce (in-context segmentation): a model whose mask decoder reads
    # examples (`model.sam.example_prompt`) is given them as well as the images its prompt shows.
    mask_examples: bool = False
    source_codes: dict[str, str] = {}  # source kind → what that source calls this task (Med-GRIT: "VG", …)
    # The source kind whose own layout the synthetic generator writes this task's records in (under a subfolder of
    # that name, read back by that kind's reader when `synth` is staged); None: the MeCoVQA layout.
    synth_source: str | None = None
    # What `medplib demo` offers for this task: (label, question template), `{text}` the page's text field, `{box}`
    # the drawn box written as Med-GRIT box text; None: not offered.
    demo: tuple[str, str] | None = None
    # A derived task's records are made from other tasks' records when a training set or an evaluation loads its
    # split (`derive`), not written by ingest: in-context segmentation builds its prompts from grounding records.
    derived: bool = False

    def check(self, turns: Sequence[dict], masks: Sequence[str], regions: Sequence[str]) -> tuple[Any, str] | None:
        """Why a record of this task cannot be used, as (the value at fault, reason); None when it can."""
        return None

    def check_context(self, context: Sequence[dict]) -> tuple[Any, str] | None:
        """Why a record's context pairs ({"image", "mask" or None}) do not suit this task; None when they do.

        The default allows up to `max_context` pairs, masks optional; an in-context segmentation task would also
        require every mask. Ingest and the GX suite run it besides `check`; whether the files exist, decode and
        match in size is checked for every image and mask by ingest and the GX suite themselves.
        """
        if len(context) > self.max_context:
            allowed = f"at most {self.max_context}" if self.max_context else "no"
            return [c.get("image") for c in context], (f"task {self.name!r} takes {allowed} context image(s) "
                                                       f"but the record has {len(context)}")
        return None

    def derive(self, pool: Sequence["Record"], purpose: str, seed: int) -> list["Record"]:
        """A derived task's records made from `pool` (the loaded records of one or more splits, every task's):
        `purpose` "train" (a stage's data mix) or "eval" (an evaluation's); the same pool and seed give the same
        records, so training and evaluation are repeatable. The default (not a derived task) makes none."""
        return []

    def figures(self, tables: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
        """Matplotlib figures this task draws from an evaluation's tables ("<split>/<task>" → …), by artifact name
        (logged as `eval/<name>.png`); the default draws none."""
        return {}

    def synth(self, scene: "Scene") -> list[dict]:
        """The raw records this task asks about one synthetic phantom (may draw from `scene.rng`): MeCoVQA records,
        or records in the layout of `synth_source` when the task sets one."""
        return []

    def synth_file(self, split: str, modality: str = "") -> str:
        """Where the synthetic generator writes this task's records of `split` (train | test) about an image of
        `modality`: the MeCoVQA file, or, with a `synth_source`, a file of that source's layout relative to its
        subfolder (a layout that tells the modality by its folders, as LViT's, puts it in the path)."""
        return self.file_for(split)

    def show_context(self, pairs: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> list[np.ndarray]:
        """The images a prompt of this task shows for its context pairs ((image uint8, mask bool or None), in order),
        one per `<image>` placeholder before the query's. The default shows each image as it is; an in-context
        segmentation task shows the example masks too (overlaid, or as images of their own)."""
        return [image for image, _ in pairs]

    def synth_images(self, scene: "Scene") -> None:
        """With a `synth_source`, make the images this task's records of `scene` need that are not under the synthetic
        root (a second view drawn from `scene.rng`), in that source's folder; called once its `synth` gave records.
        The default makes none: the source's writer (`Reader.write_synth`) links the root's images it names."""

    def from_labels(self, labelled: "LabelledSlice") -> list[dict]:
        """The raw MeCoVQA records this task asks about one real slice with label masks (DICOM, NIfTI readers)."""
        return []

    def pixel_form(self, turns: Sequence[dict], regions: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                   height: int, width: int) -> tuple[list[dict], list[np.ndarray], list[np.ndarray]] | None:
        """How MedPLIB, which reads pixel prompts and grounds through `<SEG>`, takes a record of this task whose
        prompts or answers are written in another form (boxes in text): its conversation (`strip_paths`' turns,
        `<region></region>` per prompt, `<SEG>` per answered mask) with those turned into prompts or `<SEG>`s, and the
        prompt masks and target masks (bool, `height` x `width`, the image's pixels) in the order of their tokens,
        the record's own (`regions`, `targets`) among them; None (the default): the record as it is. Training and
        evaluation both apply it (evaluation to the question); `answer` turns a generation back into the answer the
        metric reads."""
        return None

    def answer(self, text: str, masks: Sequence[np.ndarray]) -> str:
        """The response as this task's metric reads it, from a generation's text and the masks of its `<SEG>`s
        (bool, the image's pixels, in order); the default is the text. A task whose `pixel_form` answers through
        `<SEG>` writes what its masks stand for back into the text."""
        return text

    def score(self, prediction: str, reference: str, pred_masks: Sequence[np.ndarray],
              target: np.ndarray | None) -> dict:
        """The metric values of one generation (prediction text without `<SEG>`, masks, and the targets)."""
        return {}

    def metric(self) -> Cumulative:
        """A fresh aggregator for one evaluation table of this task."""
        return Cumulative()

    def headline_metric(self) -> str | None:
        """The one metric that stands for this task when the promotion gate guards against a regression."""
        if self.headline is not None:
            return self.headline
        return next((key for key, (split, _) in self.summary.items() if split == "test"), None)

    def file_for(self, split: str) -> str:
        if split in self.files:
            return self.files[split]
        title = self.family.capitalize()
        return f"train/MeCoVQA-{title}.json" if split == "train" else f"{split}/MeCoVQA_{title}_{split}.json"

    def __repr__(self) -> str:
        return f"<task {self.name}: groups {list(self.groups)}, family {self.family!r}>"


_TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add a task to the registry; a name or group clash is an error, not a silent replacement."""
    if not task.name or not task.family:
        raise ValueError(f"{task!r}: a task needs a name and a MeCoVQA family")
    if task.name in _TASKS:
        raise ValueError(f"Task {task.name!r} is already registered ({_TASKS[task.name]!r}); unregister it first")
    if task.name in groups():
        raise ValueError(f"Task name {task.name!r} is already a task group; pick another name")
    _TASKS[task.name] = task
    return task


def unregister(name: str) -> None:
    """Remove a task (plug-ins and tests that registered one)."""
    _TASKS.pop(name, None)


def get(name: str) -> Task:
    if name not in _TASKS:
        raise KeyError(f"Task {name!r} is not registered; registered tasks are {names()}")
    return _TASKS[name]


def all_tasks() -> list[Task]:
    """Registered tasks in registration order (the synthetic generator's order, so its random draws are stable)."""
    return list(_TASKS.values())


def labelled_tasks() -> list[Task]:
    """The tasks that ask about real labelled slices (they override `from_labels`)."""
    return [t for t in _TASKS.values() if type(t).from_labels is not Task.from_labels]


def names() -> list[str]:
    return list(_TASKS)


def groups() -> dict[str, list[str]]:
    """Group → the tasks in it, in registration order."""
    out: dict[str, list[str]] = {}
    for task in _TASKS.values():
        for group in task.groups:
            out.setdefault(group, []).append(task.name)
    return out


def resolve(selection: Iterable[str]) -> tuple[str, ...]:
    """Task names of a data mix given as task names and/or group names; an unknown name is an error."""
    by_group = groups()
    out: list[str] = []
    for item in selection:
        if item in _TASKS:
            chosen = [item]
        elif item in by_group:
            chosen = by_group[item]
        else:
            raise ValueError(f"{item!r} is neither a registered task ({names()}) nor a task group "
                             f"({sorted(by_group)})")
        out += [t for t in chosen if t not in out]
    return tuple(out)


def with_derived(records: Sequence["Record"], chosen: Iterable[str] | None, purpose: str, seed: int,
                 pool: Sequence["Record"] | None = None) -> list["Record"]:
    """`records` plus the records of the derived tasks among `chosen` (task names; None: every task), each made from
    `pool` (default `records`) by the task's `derive`."""
    out = list(records)
    names_ = set(_TASKS) if chosen is None else set(chosen)
    source = list(records if pool is None else pool)
    for task in _TASKS.values():
        if task.derived and task.name in names_:
            out += task.derive(source, purpose, seed)
    return out


def for_source(kind: str) -> dict[str, Task]:
    """What source `kind` calls each task that it carries → the task (the tasks' `source_codes`)."""
    return {t.source_codes[kind]: t for t in _TASKS.values() if kind in t.source_codes}


def for_family(family: str, answer_type: str) -> Task | None:
    """The task a MeCoVQA record of `family` with `answer_type` belongs to."""
    candidates = [t for t in _TASKS.values() if t.family == family]
    if len(candidates) > 1:
        candidates = [t for t in candidates if t.answer_type in (None, answer_type)]
    return candidates[0] if candidates else None


def file_words() -> list[tuple[str, str]]:
    """(word in an annotation file name, family) pairs, for readers of the MeCoVQA layout."""
    out: list[tuple[str, str]] = []
    for task in _TASKS.values():
        for word in task.file_words or (task.family,):
            if (word, task.family) not in out:
                out.append((word, task.family))
    return out


def summary_keys() -> dict[str, tuple[str, str]]:
    """Headline metric name → ("<split>/<task>" table, metric), over every registered task."""
    return {key: (f"{split}/{task.name}", metric) for task in _TASKS.values()
            for key, (split, metric) in task.summary.items()}


def headline_tables(split: str = "test") -> dict[str, tuple[str, str]]:
    """`summary_keys` measured on `split`: each test headline re-pointed to "<split>/<task>" (for "val", the
    validation counterpart); zero-shot headlines belong to the zero-shot split and are kept for "test" only."""
    keys = summary_keys()
    if split == "test":
        return keys
    return {key: (f"{split}/{table.split('/', 1)[1]}", metric) for key, (table, metric) in keys.items()
            if table.startswith("test/")}


def metric_range(key: str) -> float:
    """The full range of a summary key's metric (1.0 unless its task says otherwise, e.g. CIDEr's 10): gate tolerances
    and floors are read in its units."""
    return next((float(t.ranges[key]) for t in _TASKS.values() if key in t.ranges), 1.0)


def headline_metrics() -> list[str]:
    """Each registered task's guarded headline metric, in registration order."""
    return [m for m in (t.headline_metric() for t in _TASKS.values()) if m is not None]


def code_files() -> list[Path]:
    """The source files of every registered task's module (a cache key over them sees a changed task)."""
    mods = {type(t).__module__ for t in _TASKS.values()} | {__name__}
    return sorted(Path(inspect.getsourcefile(sys.modules[m])) for m in mods)


# The built-in tasks. Their order is the order of the headline metrics, and the order in which the synthetic
# generator asks them (closed before open before region VQA: the random draws, hence the data, depend on it).
from medplib.tasks import grounding, vqa_closed, vqa_open, region_vqa, caption  # noqa: E402,F401
# BiRD's refer-and-ground tasks (group "refer", in no stage mix yet): after the built-ins, so their order is unchanged.
from medplib.tasks import refer_vg, refer_ro, refer_gc, refer_mii  # noqa: E402,F401
# Text-guided segmentation (RecLMIS on LViT data, group "pixel"): last, so the draws of the tasks above are unchanged.
from medplib.tasks import textseg  # noqa: E402,F401
# Report generation (R2Gen's IU X-Ray / MIMIC-CXR), group "vl": after textseg, so the earlier tasks' random draws are unchanged.
from medplib.tasks import report  # noqa: E402,F401
# In-context segmentation (SegICL, groups "icl": in no stage's mix yet, no synthetic records): last.
from medplib.tasks import incontext  # noqa: E402,F401
